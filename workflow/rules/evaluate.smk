# Each rule below runs the function of its name in src/dbprepro/pipeline/evaluate.py.
# Stage 3: purification of the clean test set under random and fixed randomness.


rule evaluate_clean:
    input:
        classifier=classifier_dir(),
        diffusion=defense_diffusion_input,
        **split_files(),
    output:
        records=f"{RESULTS}/evaluation/{{defense}}/clean_records.parquet",
    params:
        n_test=config["data"]["n_test"],
        purification=defense_purification_param,
        variance_type=config["diffusion"]["schedule"]["variance_type"],
        evaluation=config["evaluation"],
        **RUNTIME,
    log:
        f"{LOGS}/evaluate_clean/{{defense}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/evaluate_clean/{{defense}}.tsv"
    threads: 1  # short jobs: two at a time use 2 cores better than one on both (import time is serial)
    resources:
        gpu=1,
        mem_mb=8000,
        runtime="2h",
    run:
        run_heavy_stage(rule, input, output, params, wildcards, log, threads)


rule gradient_modes:
    input:
        classifier=classifier_dir(),
        diffusion=diffusion_dir("vanilla"),
        **split_files(),
    output:
        csv=report(
            f"{RESULTS}/tables/gradient_modes.csv",
            caption="../report/gradient_modes.rst",
            category="Paper 1",
            subcategory="Purifier families",
            labels={"result": "Exact vs adjoint gradients"},
        ),
        seconds=f"{RESULTS}/benchmarks/gradient_modes_seconds.csv",
    params:
        purification=EXPERIMENT.main_purification(),
        families=gradient_mode_families(),
        n_images=config["families"]["gradient_modes"]["n_images"],
        repeats=config["families"]["gradient_modes"]["repeats"],
        variance_type=config["diffusion"]["schedule"]["variance_type"],
        **RUNTIME,
    log:
        f"{LOGS}/gradient_modes.log",
    benchmark:
        f"{RESULTS}/benchmarks/gradient_modes.tsv"
    threads: 1
    resources:
        gpu=1,
        mem_mb=8000,
        runtime="1h",
    run:
        run_heavy_stage(rule, input, output, params, wildcards, log, threads)
