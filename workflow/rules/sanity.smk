# Each rule below runs the function of its name in src/dbprepro/pipeline/sanity.py.
# The sanity battery (sanity section of the config): one job per (defense, threat model) runs the
# battery's own attacks and reads the attack grid's gradient runs on that defense (the reference
# ensembles) and the transfer sources' adversarial examples; then the table and the figure.
# Helpers (sanity_*): workflow/rules/common.smk.


rule sanity:
    input:
        classifier=classifier_dir(),
        diffusion=defense_diffusion_input,
        **split_files(),
        comparisons=sanity_comparison_records,
        transfer=sanity_transfer_advs,
    output:
        records=f"{RESULTS}/sanity/{{defense}}/{{threat}}/records.parquet",
    params:
        sanity=sanity_job_param,
        threat_model=sanity_threat_param,
        pgd=config["attacks"]["pgd"],
        fixed_draw=config["attacks"]["fixed_draw"],
        batch_size=config["attacks"]["batch_size"],
        purification=defense_purification_param,
        variance_type=config["diffusion"]["schedule"]["variance_type"],
        comparisons=sanity_comparisons_param,
        transfer_sources=sanity_transfer_param,
        **RUNTIME,
    log:
        f"{LOGS}/sanity/{{defense}}/{{threat}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/sanity/{{defense}}/{{threat}}.tsv"
    threads: 1
    resources:
        gpu=1,
        mem_mb=16000,
        runtime="12h",
    run:
        run_heavy_stage(rule, input, output, params, wildcards, log, threads)


rule table_sanity:
    input:
        records=sanity_records(),
    output:
        csv=report(
            f"{RESULTS}/tables/sanity.csv",
            caption="../report/sanity.rst",
            category="Overview",
            subcategory="Sanity battery",
            labels={"result": "Sanity battery: checks that flag a weak evaluation"},
        ),
        md=f"{RESULTS}/tables/sanity.md",
    params:
        max_final_accuracy=config["sanity"]["max_final_accuracy"],
        confidence=config["sanity"]["confidence"],
        resamples=config["sanity"]["resamples"],
        seed_bootstrap=config["sanity"]["seed"],
        **RUNTIME,
    log:
        f"{LOGS}/table_sanity.log",
    threads: 1
    resources:
        mem_mb=2000,
        runtime="10m",
    localrule: True
    run:
        run_light_stage(rule, input, output, params, wildcards, log)


rule figure_sanity:
    input:
        table=f"{RESULTS}/tables/sanity.csv",
        records=sanity_records(),
    output:
        png=report(
            f"{RESULTS}/figures/sanity.png",
            caption="../report/sanity.png.rst",
            category="Overview",
            subcategory="Sanity battery",
            labels={"result": "Sanity battery (figure)"},
        ),
        pdf=f"{RESULTS}/figures/sanity.pdf",
    params:
        confidence=config["sanity"]["confidence"],
        **RUNTIME,
    log:
        f"{LOGS}/figure_sanity.log",
    threads: 1
    resources:
        mem_mb=2000,
        runtime="10m",
    localrule: True
    run:
        run_light_stage(rule, input, output, params, wildcards, log)
