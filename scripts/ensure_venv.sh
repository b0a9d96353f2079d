# Sourced by scripts/run.sh and scripts/test.sh: set up $VENV (default .venv) with scripts/setup.sh only
# when it is missing or broken, or when scripts/setup.sh made it from another envs/requirements.lock than
# today's (its $VENV/dbprepro-lock.json says so; the same TORCH_SPEC is used again), so that a second run
# starts at once and a changed lock is installed before anything runs.
VENV=${VENV:-.venv}
_setup_reason=""
if [ ! -x "$VENV/bin/snakemake" ] || ! "$VENV/bin/python" -c "import dbprepro" 2>/dev/null; then
    _setup_reason="missing or broken"
elif [ -f "$VENV/dbprepro-lock.json" ]; then
    # line 1: the sha256 of the lock it was set up from, line 2: its TORCH_SPEC (empty: torch from the lock)
    _marker=$("$VENV/bin/python" -c 'import json, sys; m = json.load(open(sys.argv[1]))
print(m.get("lock_sha256") or ""); print(m.get("torch_spec") or "")' "$VENV/dbprepro-lock.json" 2>/dev/null || true)
    if [ "${_marker%%$'\n'*}" != "$(sha256sum "${LOCK:-envs/requirements.lock}" | cut -d' ' -f1)" ]; then
        _setup_reason="set up from another lock"
        case "$_marker" in *$'\n'?*) TORCH_SPEC=${TORCH_SPEC:-${_marker#*$'\n'}} ;; esac
    fi
fi
if [ -n "$_setup_reason" ]; then
    echo "environment $VENV: $_setup_reason, running scripts/setup.sh"
    start=$(date +%s)
    VENV="$VENV" TORCH_SPEC="${TORCH_SPEC:-}" bash scripts/setup.sh
    echo "set-up took $(( $(date +%s) - start )) s"
fi
