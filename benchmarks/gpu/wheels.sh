#!/usr/bin/env bash
# Download, on a machine with internet access, the wheels benchmarks/gpu/run.sh installs on an accelerator
# machine that has none: the packages robustlab and its comparisons need beyond the device image
# (pydantic and its three companions, torchattacks; typing-extensions as new as pydantic needs), for CPython 3.12 on x86-64 Linux, into .whl/.
# Then send .whl along with the working tree (it is git-ignored), e.g. the device tool's carry: [".whl"].
set -eu
cd "$(dirname "$0")/../.."
mkdir -p .whl
python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64 -d .whl \
  pydantic==2.13.4 pydantic-core==2.46.4 annotated-types==0.7.0 typing-inspection==0.4.2 torchattacks==3.5.1 \
  typing-extensions==4.15.0
ls -l .whl
