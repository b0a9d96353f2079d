# Each rule below runs the function of its name in src/dbprepro/pipeline/attacks.py.
# Stage 4: attacks (paper 1). One job per (defense, threat model, setting, attack, shard);
# shards are unions of whole fixed batches, so results do not depend on the shard count.


rule attack:
    input:
        classifier=classifier_dir(),
        diffusion=defense_diffusion_input,
        **split_files(),
    output:
        records=f"{RESULTS}/attacks/{{defense}}/{{threat}}/{{setting}}/{{attack}}/shard{{shard}}.records.parquet",
        trace=f"{RESULTS}/attacks/{{defense}}/{{threat}}/{{setting}}/{{attack}}/shard{{shard}}.trace.parquet",
        paths=f"{RESULTS}/attacks/{{defense}}/{{threat}}/{{setting}}/{{attack}}/shard{{shard}}.paths.npz",
        adv=f"{RESULTS}/attacks/{{defense}}/{{threat}}/{{setting}}/{{attack}}/shard{{shard}}.adv.npz",
    params:
        attacks=defense_attacks_param,
        purification=defense_purification_param,
        variance_type=config["diffusion"]["schedule"]["variance_type"],
        **RUNTIME,
    log:
        f"{LOGS}/attack/{{defense}}/{{threat}}/{{setting}}/{{attack}}/shard{{shard}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/attack/{{defense}}/{{threat}}/{{setting}}/{{attack}}/shard{{shard}}.tsv"
    threads: 1
    resources:
        gpu=1,
        mem_mb=16000,
        runtime="12h",
    run:
        run_heavy_stage(rule, input, output, params, wildcards, log, threads)


rule merge_attack:
    input:
        records=expand(
            f"{RESULTS}/attacks/{{{{defense}}}}/{{{{threat}}}}/{{{{setting}}}}/{{{{attack}}}}/shard{{shard}}.records.parquet",
            shard=range(config["attacks"]["shards"]),
        ),
        trace=expand(
            f"{RESULTS}/attacks/{{{{defense}}}}/{{{{threat}}}}/{{{{setting}}}}/{{{{attack}}}}/shard{{shard}}.trace.parquet",
            shard=range(config["attacks"]["shards"]),
        ),
        paths=expand(
            f"{RESULTS}/attacks/{{{{defense}}}}/{{{{threat}}}}/{{{{setting}}}}/{{{{attack}}}}/shard{{shard}}.paths.npz",
            shard=range(config["attacks"]["shards"]),
        ),
        adv=expand(
            f"{RESULTS}/attacks/{{{{defense}}}}/{{{{threat}}}}/{{{{setting}}}}/{{{{attack}}}}/shard{{shard}}.adv.npz",
            shard=range(config["attacks"]["shards"]),
        ),
    output:
        records=f"{RESULTS}/attacks/{{defense}}/{{threat}}/{{setting}}/{{attack}}/records.parquet",
        trace=f"{RESULTS}/attacks/{{defense}}/{{threat}}/{{setting}}/{{attack}}/trace.parquet",
        paths=f"{RESULTS}/attacks/{{defense}}/{{threat}}/{{setting}}/{{attack}}/paths.npz",
        adv=f"{RESULTS}/attacks/{{defense}}/{{threat}}/{{setting}}/{{attack}}/adv.npz",
    params:
        **RUNTIME,
    log:
        f"{LOGS}/merge_attack/{{defense}}/{{threat}}/{{setting}}/{{attack}}.log",
    threads: 1
    resources:
        mem_mb=2000,
        runtime="10m",
    localrule: True
    run:
        run_light_stage(rule, input, output, params, wildcards, log)
