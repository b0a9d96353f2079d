# The rule below runs the function of its name in src/dbprepro/pipeline/replicates.py.
# Replicate training seeds (replicates.seeds): each seed other than the top-level one is a Snakemake module of
# this same Snakefile with its config's seed replaced (replicates.module_seed moves its results to
# results/replicates/seed<S>/, common.smk), so every rule runs again as its own job (`replicate_seed<S>__<rule>`;
# SLURM per job as usual) on the seed's own models; the seed equal to the top-level one is the main run itself.
# Only what a seed's claims table needs is requested (no figures). Seed-independent outputs stay shared: the data
# split (data.split_seed) and the downloaded models (common.smk), whose rules are not imported.
# Why modules, not a {seed} wildcard in every rule: the rule files stay as they are, each replicate's params (its
# seed) come from its own config, so the main run's jobs and outputs are untouched by the replicates.

REPLICATE_SEEDS = config["replicates"]["seeds"]


for replicate_seed in [s for s in REPLICATE_SEEDS if s != config["seed"]]:
    replicate_module = f"replicate_seed{replicate_seed}"
    replicate_rule = f"{replicate_module}__"  # rule names: replicate_seed<S>__<rule> (dbprepro.pipeline.run)

    module:
        name: replicate_module
        snakefile: workflow.main_snakefile
        config: replicate_config(replicate_seed)

    use rule * from replicate_module exclude all, download_data, prepare_data, download_classifier, download_diffusion, download_network as replicate_rule*


if REPLICATE_SEEDS:

    rule table_claims_replicates:
        input:
            claims=[replicate_claims(s) for s in REPLICATE_SEEDS],
        output:
            csv=f"{RESULTS}/tables/claims_replicates.csv",
            md=f"{RESULTS}/tables/claims_replicates.md",
        params:
            seeds=REPLICATE_SEEDS,
            alpha=config["claims"]["alpha"],
            confidence=config["evaluation"]["confidence"],
        log:
            f"{LOGS}/table_claims_replicates.log",
        threads: 1
        resources:
            mem_mb=2000,
            runtime="10m",
        localrule: True
        run:
            run_light_stage(rule, input, output, params, wildcards, log)
