#!/usr/bin/env bash
# One-command set-up of dbprepro: a virtual environment in .venv with everything
# the DAG, the tests and the SLURM/DVC paths need.
#
#   bash scripts/setup.sh
#
# Environment knobs:
#   VENV=.venv                 where to create the environment
#   PYTHON=python3             interpreter (>= 3.11)
#   TORCH_SPEC="torch==2.13.0" what to install for torch first; on a CUDA cluster use e.g.
#                              TORCH_SPEC="torch --index-url https://download.pytorch.org/whl/cu124"
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}

"$PYTHON" -m venv "$VENV"
PIP="$VENV/bin/python -m pip"
$PIP install --quiet --upgrade pip
# 1. torch first, so that the package's "torch>=2.3" is already satisfied and no
#    other (multi-GB CUDA) build gets pulled in by the resolver.
$PIP install $TORCH_SPEC
# 2. the package, editable, with test extras.
$PIP install -e ".[test]"
# 3. torchattacks without its declared deps (requests~=2.25.1 and torchvision):
#    its code needs only torch, numpy and scipy, all installed above.
$PIP install --no-deps "torchattacks==3.5.1"
$VENV/bin/python -c "import torchattacks, torch, diffusers, snakemake; print('dbprepro environment ready: torch', torch.__version__, 'diffusers', diffusers.__version__, 'torchattacks', torchattacks.__version__)"
