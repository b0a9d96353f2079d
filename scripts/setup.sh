#!/usr/bin/env bash
# One-command set-up of dbprepro: a virtual environment in .venv with exactly the versions of
# envs/requirements.lock (every package hashed), then the package itself, editable.
#
#   bash scripts/setup.sh
#
# Environment knobs:
#   VENV=.venv                 where to create the environment (an existing one is brought to the lock)
#   PYTHON=python3             interpreter (3.11: the lock is resolved for CPython 3.11 on x86_64 Linux)
#   LOCK=envs/requirements.lock  the lock to install (refresh it with scripts/lock.sh)
#   TORCH_SPEC=                empty: torch from the lock (2.13.0, CPU build).  Set, torch comes from it instead and
#                              every other line of the lock is still installed exactly; on a CUDA cluster e.g.
#                              TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu126"
# The choice is recorded in $VENV/dbprepro-lock.json, which `dbprepro doctor` and every run's provenance read.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
LOCK=${LOCK:-envs/requirements.lock}
TORCH_SPEC=${TORCH_SPEC:-}

"$PYTHON" -m venv "$VENV"
PIP="$VENV/bin/python -m pip"
$PIP install --quiet --upgrade pip
# 1. the lock, exactly: every line pinned with ==, every file checked against its sha256, no resolver
#    (--no-deps: the lock already lists every dependency; torchattacks' wrong declared ones stay out).
if [ -z "$TORCH_SPEC" ]; then
    $PIP install --require-hashes --no-deps -r "$LOCK"
    torch_source=lock
else
    # the lock without its torch entry (the pinned line, its --hash lines and its "# via" comments)
    nolock=$(mktemp)
    trap 'rm -f "$nolock"' EXIT
    awk '/^torch==/ {skip = 1; next} skip && /^[ \t]/ {next} {skip = 0; print}' "$LOCK" > "$nolock"
    $PIP install --require-hashes --no-deps -r "$nolock"
    # 2. torch from TORCH_SPEC, with its own dependencies (a CUDA build brings its nvidia-* libraries)
    $PIP install $TORCH_SPEC
    torch_source=TORCH_SPEC
fi
# 3. the package itself, editable, from the locked setuptools (no build environment fetched)
$PIP install --no-deps --no-build-isolation -e .
# 4. what was installed, for `dbprepro doctor` and provenance (dbprepro.envlock reads it)
esc() { local s=${1//\\/\\\\}; printf '"%s"' "${s//\"/\\\"}"; }
cat > "$VENV/dbprepro-lock.json" <<JSON
{
  "lock": $(esc "$LOCK"),
  "lock_sha256": "$(sha256sum "$LOCK" | cut -d' ' -f1)",
  "torch_source": "$torch_source",
  "torch_spec": $(esc "$TORCH_SPEC"),
  "installed_utc": "$(date -u +%Y-%m-%dT%H:%M:%SZ)"
}
JSON
$VENV/bin/python -c "import torchattacks, torch, diffusers, snakemake; print('dbprepro environment ready: torch', torch.__version__, 'diffusers', diffusers.__version__, 'torchattacks', torchattacks.__version__)"
