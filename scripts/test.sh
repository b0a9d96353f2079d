#!/usr/bin/env bash
# The tests in one command (what CI runs): set up .venv if needed, then run pytest.
#
#   bash scripts/test.sh                                  # every test, the smoke DAG and SLURM ones included
#   bash scripts/test.sh tests/test_api.py -m "not slow"  # any pytest arguments pass through
#
# Environment knobs: VENV=.venv (the environment to use or create), and those of scripts/setup.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/ensure_venv.sh  # set up .venv only if it is missing or broken

# pytest with the environment's Python; extra arguments go to pytest unchanged.
exec "$VENV/bin/python" -m pytest "$@"
