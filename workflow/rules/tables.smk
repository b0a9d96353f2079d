# Each rule below runs the function of its name in src/dbprepro/pipeline/tables.py.
# Stage 4: metric tables (pandas), from the per-sample records of the evaluation stages.


rule table_clean_accuracy:
    input:
        records=expand(f"{RESULTS}/evaluation/{{defense}}/clean_records.parquet", defense=EVAL_DEFENSES),
    output:
        csv=report(
            f"{RESULTS}/tables/clean_accuracy.csv",
            caption="../report/clean_accuracy.rst",
            category="Setup",
            subcategory="Clean accuracy",
            labels={"result": "Clean accuracy of every model"},
        ),
        md=f"{RESULTS}/tables/clean_accuracy.md",
    params:
        defenses=EVAL_DEFENSES,
        confidence=config["evaluation"]["confidence"],
        **RUNTIME,
    log:
        f"{LOGS}/table_clean_accuracy.log",
    threads: 1
    resources:
        mem_mb=2000,
        runtime="10m",
    localrule: True
    run:
        run_light_stage(rule, input, output, params, wildcards, log)


rule table_p1_main:
    input:
        records=merged_attack_records(),
        clean=expand(f"{RESULTS}/evaluation/{{defense}}/clean_records.parquet", defense=EVAL_DEFENSES),
    output:
        csv=report(
            f"{RESULTS}/tables/p1_table_main.csv",
            caption="../report/p1_table_main.rst",
            category="Paper 1",
            subcategory="Robustness",
            labels={"result": "Main table: clean and robust accuracy"},
        ),
        md=f"{RESULTS}/tables/p1_table_main.md",
    params:
        defenses=EVAL_DEFENSES,
        confidence=config["evaluation"]["confidence"],
        fixed_draw=config["attacks"]["fixed_draw"],
        **RUNTIME,
    log:
        f"{LOGS}/table_p1_main.log",
    threads: 1
    resources:
        mem_mb=2000,
        runtime="10m",
    localrule: True
    run:
        run_light_stage(rule, input, output, params, wildcards, log)


rule table_addt_training:
    input:
        history=expand(f"{RESULTS}/models/diffusion/{{defense}}_history.csv", defense=ADDT_VARIANTS),
        timing=expand(f"{RESULTS}/benchmarks/addt/{{defense}}_timing.csv", defense=ADDT_VARIANTS),
    output:
        csv=report(
            f"{RESULTS}/tables/addt_training.csv",
            caption="../report/addt_training.rst",
            category="Paper 1",
            subcategory="ADDT",
            labels={"result": "ADDT training curves and step cost"},
        ),
        md=f"{RESULTS}/tables/addt_training.md",
        cost=report(
            f"{RESULTS}/benchmarks/addt_cost.csv",
            caption="../report/addt_cost.rst",
            category="Paper 1",
            subcategory="ADDT",
            labels={"result": "ADDT measured wall time (benchmark)"},
        ),
    params:
        **RUNTIME,
    log:
        f"{LOGS}/table_addt_training.log",
    threads: 1
    resources:
        mem_mb=2000,
        runtime="10m",
    localrule: True
    run:
        run_light_stage(rule, input, output, params, wildcards, log)


rule table_p1_ablation:
    input:
        main=f"{RESULTS}/tables/p1_table_main.csv",
    output:
        csv=report(
            f"{RESULTS}/tables/p1_table_ablation.csv",
            caption="../report/p1_table_ablation.rst",
            category="Paper 1",
            subcategory="ADDT",
            labels={"result": "Table 6 and ablations"},
        ),
        md=f"{RESULTS}/tables/p1_table_ablation.md",
    params:
        defenses=[*DEFENSES, *FAMILY_DEFENSES],  # the vote defense is no ADDT ablation row (it is in the waterfall)
        families={d: EXPERIMENT.defense(d).sampler for d in [*DEFENSES, *FAMILY_DEFENSES]},
        threat=config["addt"]["attack_threat_models"][0],
        **RUNTIME,
    log:
        f"{LOGS}/table_p1_ablation.log",
    threads: 1
    resources:
        mem_mb=2000,
        runtime="10m",
    localrule: True
    run:
        run_light_stage(rule, input, output, params, wildcards, log)


rule table_p1_families:
    input:
        main=f"{RESULTS}/tables/p1_table_main.csv",
    output:
        csv=report(
            f"{RESULTS}/tables/p1_table_families.csv",
            caption="../report/p1_table_families.rst",
            category="Paper 1",
            subcategory="Purifier families",
            labels={"result": "Families: vanilla vs ADDT"},
        ),
        md=f"{RESULTS}/tables/p1_table_families.md",
    params:
        rows=family_table_rows(),
        threat=config["families"]["threat_models"][0],
        settings=config["families"]["settings"],
        **RUNTIME,
    log:
        f"{LOGS}/table_p1_families.log",
    threads: 1
    resources:
        mem_mb=2000,
        runtime="10m",
    localrule: True
    run:
        run_light_stage(rule, input, output, params, wildcards, log)


rule table_waterfall:
    input:
        records=merged_attack_records(),  # per image: the ensemble of every run of a defense
    output:
        csv=report(
            f"{RESULTS}/tables/waterfall.csv",
            caption="../report/waterfall.rst",
            category="Overview",
            subcategory="Robustness waterfall",
            labels={"result": "Robustness waterfall: robust accuracy against every attack so far, per image"},
        ),
        md=f"{RESULTS}/tables/waterfall.md",
    params:
        costs=waterfall_run_costs(),
        stages=waterfall_stages(),  # the stage order, read from the attack registry here: the stage imports no attack
        defenses=EVAL_DEFENSES,
        confidence=config["evaluation"]["confidence"],
        resamples=config["claims"]["resamples"],
        **RUNTIME,
    log:
        f"{LOGS}/table_waterfall.log",
    threads: 1
    resources:
        mem_mb=2000,
        runtime="10m",
    localrule: True
    run:
        run_light_stage(rule, input, output, params, wildcards, log)
