# Each rule below runs the function of its name in src/dbprepro/pipeline/report.py.
# Stage 7: the overview - the papers' numbers beside the reproduced ones
# (src/dbprepro/reference/paper_numbers.csv) and every testable claim as a verdict (claims.csv).
# The values come from tables other rules wrote; on the digits default they are digits values
# (column `dataset`), not CIFAR-10.  Runs in the Snakemake process (a join of small CSVs).


from dbprepro.reference import PAPER_NUMBERS

# P2_THREAT, P2_FIXED_SETTINGS, P2: workflow/rules/paper2.smk (included before this file)


rule paper_vs_reproduced:
    input:
        paper_vs_reproduced_inputs(),
        reference=str(PAPER_NUMBERS),
    output:
        csv=report(
            f"{RESULTS}/tables/paper_vs_reproduced.csv",
            caption="../report/paper_vs_reproduced.rst",
            category="Overview",
            subcategory="Paper vs reproduced",
            labels={"result": "Paper values beside reproduced values"},
        ),
        md=f"{RESULTS}/tables/paper_vs_reproduced.md",
    params:
        dataset=config["data"]["dataset"],
        name=config["name"],
    log:
        f"{LOGS}/paper_vs_reproduced.log",
    localrule: True
    run:
        run_light_stage(rule, input, output, params, wildcards, log)


rule table_claims:
    input:
        records=claims_records(),
        clean=expand(f"{RESULTS}/evaluation/{{defense}}/clean_records.parquet", defense=EVAL_DEFENSES),
        **claims_p2_tables(),
    output:
        csv=report(
            f"{RESULTS}/tables/claims.csv",
            caption="../report/claims.rst",
            category="Overview",
            subcategory="Claims",
            labels={"result": "Every testable claim of both papers as a verdict"},
        ),
        md=f"{RESULTS}/tables/claims.md",
    params:
        defenses={d: dict(sampler=s.sampler, finetune=s.finetune) for d, s in EXPERIMENT.defenses.items()},
        threat=P2_THREAT,
        fixed_settings=P2_FIXED_SETTINGS if config["analysis"]["enabled"] else [],
        n_images=P2["n_images"],
        evaluation=P2["evaluation"],
        confidence=config["evaluation"]["confidence"],
        claims=config["claims"],
        **RUNTIME,
    log:
        f"{LOGS}/table_claims.log",
    threads: 1
    resources:
        mem_mb=2000,
        runtime="10m",
    localrule: True
    run:
        run_light_stage(rule, input, output, params, wildcards, log)
