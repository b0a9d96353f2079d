# Stage 3: purification of the clean test set under random and fixed randomness.


rule evaluate_clean:
    input:
        classifier=classifier_dir(),
        diffusion=diffusion_dir("{defense}"),
        **split_files(),
    output:
        records=f"{RESULTS}/evaluation/{{defense}}/clean_records.parquet",
    params:
        n_test=config["data"]["n_test"],
        purification=config["purification"],
        variance_type=config["diffusion"]["schedule"]["variance_type"],
        evaluation=config["evaluation"],
        **RUNTIME,
    log:
        f"{LOGS}/evaluate_clean/{{defense}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/evaluate_clean/{{defense}}.tsv"
    threads: 2
    resources:
        gpu=1,
        mem_mb=8000,
        runtime="2h",
    conda:
        "../../envs/dbprepro.yaml"
    script:
        "../scripts/stage.py"
