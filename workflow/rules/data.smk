# Each rule below runs the function of its name in src/dbprepro/pipeline/data.py.
# Stage 1: the data split (digits: built from scikit-learn; cifar10: downloaded parquet files).


if config["data"]["dataset"] == "cifar10":

    rule download_data:
        output:
            directory(f"{RESULTS}/downloads/cifar10"),
        params:
            download=config["data"].get("download"),
            **RUNTIME,
        log:
            f"{LOGS}/download_data.log",
        threads: 1
        resources:
            mem_mb=4000,
            runtime="30m",
        run:
            run_heavy_stage(rule, input, output, params, wildcards, log, threads)


rule prepare_data:
    input:
        source=(
            f"{RESULTS}/downloads/cifar10" if config["data"]["dataset"] == "cifar10" else []
        ),
    output:
        **split_files(),
    params:
        data=config["data"],
        **RUNTIME,
    log:
        f"{LOGS}/prepare_data.log",
    threads: 1
    resources:
        mem_mb=4000,
        runtime="20m",
    run:
        run_heavy_stage(rule, input, output, params, wildcards, log, threads)
