# Sourced by scripts/run.sh and scripts/test.sh: set up $VENV (default .venv) with scripts/setup.sh only
# when it is missing or broken, so that a second run starts at once.
VENV=${VENV:-.venv}
if [ ! -x "$VENV/bin/snakemake" ] || ! "$VENV/bin/python" -c "import dbprepro" 2>/dev/null; then
    start=$(date +%s)
    VENV="$VENV" bash scripts/setup.sh
    echo "set-up took $(( $(date +%s) - start )) s"
fi
