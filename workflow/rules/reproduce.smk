# Each rule below runs the function of its name in src/dbprepro/pipeline/reproduce.py.
# The reproduction check (not in the default target; `snakemake compare_runs`): this run's tables,
# per-image attack records and claims against the recorded run of reproduction.recorded (a folder
# the DAG does not make, read as a plain input path: docs/results_tables by default).
from pathlib import Path

from dbprepro.reproduce.compare import RunTree


def reproduction_recorded(wildcards=None):
    """reproduction.recorded, relative to the repository (the Snakefile's folder) unless absolute."""
    path = Path(config["reproduction"]["recorded"])
    return str(path if path.is_absolute() else Path(workflow.basedir) / path)


def reproduction_new_inputs(wildcards):
    """This run's tables (the default target's) and, when the recorded run has them, its attack records
    (input functions: evaluated only when the target is asked for, never for the default run)."""
    tables = [t for t in all_targets() if t.startswith(f"{RESULTS}/tables/") and t.endswith(".csv")]
    recorded = Path(reproduction_recorded())
    try:
        has_records = RunTree.locate(recorded).attacks is not None
    except FileNotFoundError:  # no such folder / no tables: Snakemake names the missing input
        has_records = False
    return tables + (merged_attack_records() if has_records else [])


rule compare_runs:
    input:
        recorded=reproduction_recorded,
        new=reproduction_new_inputs,
    output:
        csv=f"{RESULTS}/reproduction/compare.csv",
        md=f"{RESULTS}/reproduction/compare.md",
        cells=f"{RESULTS}/reproduction/compare_cells.csv",
    params:
        tolerance=config["reproduction"],
        alpha=config["claims"]["alpha"],
    log:
        f"{LOGS}/compare_runs.log",
    localrule: True
    run:
        run_light_stage(rule, input, output, params, wildcards, log)
