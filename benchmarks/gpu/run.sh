#!/usr/bin/env bash
# One accelerator run, one command:     bash benchmarks/gpu/run.sh            (from the repository root)
# The same steps at toy size on a CPU:   bash benchmarks/gpu/run.sh --smoke    (under 2 minutes)
# A later run's share:                  bash benchmarks/gpu/run.sh --only c --runs hybrid
#
# Hard-limited to 9 minutes of wall time (--smoke: 115 s); steps run in priority order, each under its
# own time limit, and each writes its results under $OUT (default ./gpu-results) as soon as it finishes:
#   (a) pytest -m gpu                       -> run.log
#   (b) throughput: ResNet-18 train step at fp32 / bf16 / bf16+channels-last / +compile, robustlab vs a
#       minimal loop; PGD-AT; PGD-10 vs torchattacks                             -> b_throughput.json
#   (c) PreAct-ResNet-18 CIFAR-10 eps 8/255: 15 epochs Fast-AT, 15 hybrid, PGD-50-10 + AutoAttack on the
#       first 1,000 test images                                                  -> c_cifar10.json
#   (d) EfficientNet-B0 ImageNet subset, standard and hybrid (only with time left) -> d_imagenet.json
# plus env.txt (machine, driver, versions, commit) and summary.md (each step's status and seconds).
# A working tree sent without .git names its commit in $ROBUSTLAB_COMMIT; CIFAR-10 can travel in two parts
# (benchmarks/gpu/pack_cifar10.py), unpacked there into a folder that $ROBUSTLAB_DATA names.
# Missing Python packages (pydantic, torchattacks on the device image) are installed from wheels in
# .whl/ (benchmarks/gpu/wheels.sh puts them there), else from the package index if it can be reached.
set -u
cd "$(dirname "$0")/../.."
ROOT=$(pwd)
SMOKE=""
ONLY="a,b,c,d"
RUNS=""
while [ $# -gt 0 ]; do
  case $1 in
    --smoke) SMOKE="--smoke" ;;
    --only) ONLY=$2; shift ;;
    --runs) RUNS="--runs $2"; shift ;;
    *) echo "error: unknown argument $1 (expected --smoke, --only STEPS such as c,d, --runs RUNS such as hybrid)" >&2
       exit 2 ;;
  esac
  shift
done
wanted() { [[ ",$ONLY," == *",$1,"* ]]; }
OUT=${OUT:-$ROOT/gpu-results}
mkdir -p "$OUT"
if [ -n "$SMOKE" ]; then BUDGET=${GPU_RUN_BUDGET_S:-115}; else BUDGET=${GPU_RUN_BUDGET_S:-540}; fi
START=$(date +%s)
DEADLINE=$((START + BUDGET))
PY=${PYTHON:-python3}
export PYTHONPATH="$ROOT/src:$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
LOG="$OUT/run.log"
SUMMARY="$OUT/summary.md"
: >"$LOG"
echo "# benchmarks/gpu/run.sh ${SMOKE:-(full)}: $(date -u +%FT%TZ), budget ${BUDGET} s" >"$SUMMARY"

left() { echo $((DEADLINE - $(date +%s))); }

# step NAME CAP_SECONDS COMMAND...: run under min(CAP, time left - 5 s); record status and seconds
step() {
  local name=$1 cap=$2
  shift 2
  local limit
  limit=$(left)
  limit=$((limit - 5 < cap ? limit - 5 : cap))
  if [ "$limit" -lt 10 ]; then
    echo "- $name: skipped (no time left)" >>"$SUMMARY"
    return
  fi
  local t0 rc
  t0=$(date +%s)
  echo "=== $name (limit ${limit} s) ===" >>"$LOG"
  timeout --kill-after=5 "$limit" "$@" >>"$LOG" 2>&1
  rc=$?
  local status="ok"
  [ $rc -eq 124 ] || [ $rc -eq 137 ] && status="stopped at its ${limit} s limit"
  [ $rc -ne 0 ] && [ "$status" = "ok" ] && status="failed (exit $rc)"
  echo "- $name: $status, $(($(date +%s) - t0)) s" >>"$SUMMARY"
}

{
  echo "commit: ${ROBUSTLAB_COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}"
  echo "python: $($PY -V 2>&1)"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
  $PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'available', torch.cuda.is_available())"
  nproc
} >"$OUT/env.txt" 2>&1

# setup: the packages robustlab and the comparison need
if ! $PY -c "import pydantic, typer, safetensors, torchattacks" 2>/dev/null; then
  if ls .whl/*.whl >/dev/null 2>&1; then
    step "setup: wheels from .whl" 60 $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
      --upgrade --target /tmp/robustlab-site .whl/*.whl
    export PYTHONPATH="$PYTHONPATH:/tmp/robustlab-site"
  else
    step "setup: pip install -e .[test]" 60 $PY -m pip install -q --retries 0 --timeout 10 -e ".[test]"
  fi
fi

# each smoke step may take a quarter of the budget, (d) the rest; the full run's (c) and (d) share what is left
if [ -n "$SMOKE" ]; then A=$((BUDGET / 4)); B=$A; C=$A; else A=150; B=100; C=100000; fi
wanted a && step "(a) pytest -m gpu" $A $PY -m pytest tests/test_gpu.py -m gpu -p no:cacheprovider -rs
wanted b && step "(b) throughput" $B $PY benchmarks/gpu/steps.py throughput --out "$OUT" $SMOKE
wanted c && step "(c) CIFAR-10 Fast-AT and hybrid" $C $PY benchmarks/gpu/steps.py cifar --out "$OUT" $SMOKE $RUNS \
  --deadline $((DEADLINE - 10))
wanted d && step "(d) ImageNet subset" 100000 $PY benchmarks/gpu/steps.py imagenet --out "$OUT" $SMOKE $RUNS \
  --deadline $((DEADLINE - 10))
echo "total: $(($(date +%s) - START)) s of ${BUDGET} s" >>"$SUMMARY"
cat "$SUMMARY"
