# Each rule below runs the function of its name in src/dbprepro/pipeline/models.py.
# Stage 2: base models. source "train": trained by the DAG; source "download": fetched from
# the hub / a URL and verified against the sha256 values in the config.


if config["classifier"]["source"] == "train":

    rule train_classifier:
        input:
            **split_files(),
        output:
            model=directory(classifier_dir()),
            history=f"{RESULTS}/models/classifier_history.csv",
        params:
            classifier=config["classifier"],
            **RUNTIME,
        log:
            f"{LOGS}/train_classifier.log",
        benchmark:
            f"{RESULTS}/benchmarks/train_classifier.tsv"
        threads: 1
        resources:
            gpu=1,
            mem_mb=4000,
            runtime="2h",
        run:
            run_heavy_stage(rule, input, output, params, wildcards, log, threads)

else:

    rule download_classifier:
        output:
            model=directory(classifier_dir()),
            raw=f"{RESULTS}/downloads/classifier/{config['classifier'].get('download', {}).get('filename', 'weights.pt')}",
        params:
            classifier=config["classifier"],
            **RUNTIME,
        log:
            f"{LOGS}/download_classifier.log",
        threads: 1
        resources:
            mem_mb=4000,
            runtime="30m",
        run:
            run_heavy_stage(rule, input, output, params, wildcards, log, threads)


if config["diffusion"]["source"] == "train":

    rule train_diffusion:
        input:
            **split_files(),
        output:
            model=directory(diffusion_dir("vanilla")),
            history=f"{RESULTS}/models/diffusion/vanilla_history.csv",
        params:
            diffusion=config["diffusion"],
            **RUNTIME,
        log:
            f"{LOGS}/train_diffusion.log",
        benchmark:
            f"{RESULTS}/benchmarks/train_diffusion.tsv"
        threads: 2
        resources:
            gpu=1,
            mem_mb=8000,
            runtime="4h",
        run:
            run_heavy_stage(rule, input, output, params, wildcards, log, threads)

else:

    rule download_diffusion:
        output:
            model=directory(diffusion_dir("vanilla")),
        params:
            download=config["diffusion"].get("download"),
            **RUNTIME,
        log:
            f"{LOGS}/download_diffusion.log",
        threads: 1
        resources:
            mem_mb=4000,
            runtime="30m",
        run:
            run_heavy_stage(rule, input, output, params, wildcards, log, threads)


rule download_network:
    input:
        base=diffusion_dir("vanilla"),
    output:
        model=directory(f"{RESULTS}/models/diffusion/{{network}}"),
    wildcard_constraints:
        network="|".join(EXPERIMENT.networks) or "^$",
    params:
        network=lambda wildcards: EXPERIMENT.networks[wildcards.network],
        downloads=f"{RESULTS}/downloads/networks",  # the official file, not an output: placed by hand if need be
        **RUNTIME,
    log:
        f"{LOGS}/download_network/{{network}}.log",
    threads: 1
    resources:
        mem_mb=8000,
        runtime="1h",
    run:
        run_heavy_stage(rule, input, output, params, wildcards, log, threads)


rule train_addt:
    input:
        base=diffusion_dir("vanilla"),
        classifier=classifier_dir(),
        **split_files(),
    output:
        model=directory(f"{RESULTS}/models/diffusion/{{defense}}"),
        history=f"{RESULTS}/models/diffusion/{{defense}}_history.csv",
        timing=f"{RESULTS}/benchmarks/addt/{{defense}}_timing.csv",
    wildcard_constraints:
        defense="|".join(EXPERIMENT.trained_defenses),
    params:
        addt=config["addt"],
        variant=lambda wildcards: EXPERIMENT.defense(wildcards.defense).finetune,
        family=lambda wildcards: EXPERIMENT.finetune_family(wildcards.defense),
        purification=defense_purification_param,
        checkpoint_dir=f"{RESULTS}/checkpoints/addt/{{defense}}",
        **RUNTIME,
    log:
        f"{LOGS}/train_addt/{{defense}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/train_addt/{{defense}}.tsv"
    threads: 1
    resources:
        gpu=1,
        mem_mb=16000,
        runtime="48h",
    run:
        run_heavy_stage(rule, input, output, params, wildcards, log, threads)
