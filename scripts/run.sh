#!/usr/bin/env bash
# The full pipeline in one command: set up .venv if needed, then run Snakemake.
#
#   bash scripts/run.sh                                               # everything: snakemake --cores all
#   bash scripts/run.sh results/figures/p1_fig3_robustness_bars.png   # one target and only the jobs it needs
#   bash scripts/run.sh -n                                            # any other snakemake arguments pass through
#
# Environment knobs: VENV=.venv (the environment to use or create), and those of scripts/setup.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/ensure_venv.sh  # set up .venv only if it is missing or broken

# The default run; extra arguments (targets, -n, --configfile ...) go to Snakemake unchanged.
exec "$VENV/bin/snakemake" --cores all "$@"
