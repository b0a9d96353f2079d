# Stage 4: metric tables (pandas), from the per-sample records of the evaluation stages.


rule table_clean_accuracy:
    input:
        records=expand(f"{RESULTS}/evaluation/{{defense}}/clean_records.parquet", defense=DEFENSES),
    output:
        csv=f"{RESULTS}/tables/clean_accuracy.csv",
        md=f"{RESULTS}/tables/clean_accuracy.md",
    params:
        defenses=DEFENSES,
        confidence=config["evaluation"]["confidence"],
        **RUNTIME,
    log:
        f"{LOGS}/table_clean_accuracy.log",
    threads: 1
    resources:
        mem_mb=2000,
        runtime="10m",
    conda:
        "../../envs/dbprepro.yaml"
    script:
        "../scripts/stage.py"


rule table_p1_main:
    input:
        records=merged_attack_records(),
        clean=expand(f"{RESULTS}/evaluation/{{defense}}/clean_records.parquet", defense=DEFENSES),
    output:
        csv=f"{RESULTS}/tables/p1_table_main.csv",
        md=f"{RESULTS}/tables/p1_table_main.md",
    params:
        defenses=DEFENSES,
        confidence=config["evaluation"]["confidence"],
        fixed_draw=config["attacks"]["fixed_draw"],
        **RUNTIME,
    log:
        f"{LOGS}/table_p1_main.log",
    threads: 1
    resources:
        mem_mb=2000,
        runtime="10m",
    conda:
        "../../envs/dbprepro.yaml"
    script:
        "../scripts/stage.py"
