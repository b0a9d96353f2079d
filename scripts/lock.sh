#!/usr/bin/env bash
# Refresh envs/requirements.lock, the exact, hashed versions that scripts/setup.sh installs.
#
#   bash scripts/lock.sh              # re-resolve; every version already in the lock stays unless pyproject.toml
#                                     # or envs/constraints.in no longer admits it (new dependencies get the newest)
#   UPGRADE=1 bash scripts/lock.sh    # every package to the newest release pyproject.toml admits
#
# The resolver is uv (`uv pip compile --generate-hashes`), pinned below and installed into a throw-away venv.
# The lock is made of two uv outputs: pyproject.toml with its test extra under envs/constraints.in (the torch
# build), then envs/nodeps.in resolved without dependencies (torchattacks, whose declared ones are wrong).
# Target: CPython 3.11 on x86_64 Linux (the hashes cover every file of each pinned version).
# Environment knobs: PYTHON=python3 (runs uv), UV_VERSION, UPGRADE=1, and uv's own (UV_FIND_LINKS,
# UV_EXTRA_INDEX_URL, ...).  UV_FIND_LINKS defaults to pip's configured find-links, where the CPU build of torch
# lies on this project's machines; elsewhere point it (or UV_EXTRA_INDEX_URL) at a folder or index with that wheel.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
UV_VERSION=${UV_VERSION:-0.13.9}
LOCK=envs/requirements.lock
if [ -z "${UV_FIND_LINKS:-}" ]; then
    UV_FIND_LINKS=$("$PYTHON" -m pip config get global.find-links 2>/dev/null || true)
    [ -n "$UV_FIND_LINKS" ] && export UV_FIND_LINKS
fi

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
"$PYTHON" -m venv "$tmp/uv"
"$tmp/uv/bin/python" -m pip install --quiet "uv==$UV_VERSION"
UV="$tmp/uv/bin/uv"
target=(--python-version 3.11 --python-platform x86_64-manylinux_2_28 --generate-hashes)
export UV_CUSTOM_COMPILE_COMMAND="bash scripts/lock.sh"

# uv keeps the versions of the output file it is given unless --upgrade: start from the current lock.
[ -f "$LOCK" ] && cp "$LOCK" "$tmp/main.lock"
"$UV" pip compile pyproject.toml --extra test -c envs/constraints.in "${target[@]}" ${UPGRADE:+--upgrade} \
    --quiet -o "$tmp/main.lock"
"$UV" pip compile envs/nodeps.in --no-deps "${target[@]}" --no-header --quiet -o "$tmp/nodeps.lock"
{
    cat "$tmp/main.lock"
    echo "# --- envs/nodeps.in: resolved WITHOUT their declared dependencies (uv pip compile --no-deps) ---"
    cat "$tmp/nodeps.lock"
} > "$LOCK"
echo "wrote $LOCK: $(grep -c '^[A-Za-z0-9]' "$LOCK") packages, sha256 $(sha256sum "$LOCK" | cut -d' ' -f1)"
