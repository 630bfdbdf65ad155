"""``python -m robustlab``: the same as the ``robustlab`` console command."""

from robustlab.cli import main

main()
