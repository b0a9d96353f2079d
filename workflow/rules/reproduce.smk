# Each rule below runs the function of its name in src/dbprepro/pipeline/reproduce.py.
# The reproduction check (not in the default target; `snakemake compare_runs`): this run's tables,
# per-image attack records and claims against the recorded run of reproduction.recorded (a folder
# the DAG does not make, read as a plain input path: docs/results_tables by default, relative to
# the repository).  The inputs are read only when the target is asked for.
from dbprepro.reproduce.compare import has_attack_records, resolve_recorded

REPRODUCTION_RECORDED = resolve_recorded(config["reproduction"]["recorded"], workflow.basedir)


rule compare_runs:
    input:
        recorded=REPRODUCTION_RECORDED,
        # this run's tables (the default target's) and, if the recorded run has them, its attack records
        new=lambda wildcards: [t for t in all_targets() if t.startswith(f"{RESULTS}/tables/") and t.endswith(".csv")]
        + (merged_attack_records() if has_attack_records(REPRODUCTION_RECORDED) else []),
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
