#!/usr/bin/env bash
# The tests in one command (what CI runs): set up .venv if needed, then run pytest.
#
#   bash scripts/test.sh                                  # every test, the smoke DAG and SLURM ones included
#   bash scripts/test.sh tests/test_api.py -m "not slow"  # any pytest arguments pass through
#
# Environment knobs: VENV=.venv (the environment to use or create), and those of scripts/setup.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}

# Set up only when the environment is missing or broken (a second run starts pytest at once).
if [ ! -x "$VENV/bin/snakemake" ] || ! "$VENV/bin/python" -c "import dbprepro" 2>/dev/null; then
    start=$(date +%s)
    VENV="$VENV" bash scripts/setup.sh
    echo "set-up took $(( $(date +%s) - start )) s"
fi

# pytest with the environment's Python; extra arguments go to pytest unchanged.
exec "$VENV/bin/python" -m pytest "$@"
