# Thin Snakemake script: every rule runs its dbprepro stage (chosen by the rule name).
from dbprepro.pipeline import run_stage

run_stage(snakemake)  # noqa: F821 - injected by Snakemake
