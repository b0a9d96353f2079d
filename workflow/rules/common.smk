# Helpers shared by every stage file - config validation, the typed experiment, paths and target lists.
# This file runs on every DAG build and dry run: the purifier and attack registries it reads import
# torch (~3 s), nothing heavier (no diffusers, no models).
from snakemake.exceptions import WorkflowError
from snakemake.utils import min_version

from dbprepro.attacks import attack_names
from dbprepro.config import ConfigError, Experiment, check_dag_config, threat_model, validate_config
from dbprepro.sanity.plan import battery_jobs, comparison_runs, transfer_sources

min_version("9.20")

try:
    validate_config(config)  # JSON schema (snakemake.utils.validate) + semantic checks, fills defaults
    check_dag_config(config)  # what only the whole DAG needs
except ConfigError as err:
    raise WorkflowError(f"invalid configuration: {err}")


ATTACK_NAMES = attack_names()
# A replicate seed's module (workflow/rules/replicates.smk sets replicates.module_seed) writes its own
# results and logs; the seed-independent outputs (data split, downloads, downloaded models) stay shared.
MODULE_SEED = config["replicates"]["module_seed"]
SHARED_RESULTS = "results"


def replicate_results(seed):
    """Where replicate ``seed`` (replicates.seeds, workflow/rules/replicates.smk) writes its results."""
    return f"{SHARED_RESULTS}/replicates/seed{seed}"


RESULTS = SHARED_RESULTS if MODULE_SEED is None else replicate_results(MODULE_SEED)
LOGS = "logs" if MODULE_SEED is None else f"logs/replicates/seed{MODULE_SEED}"
EXPERIMENT = Experiment.from_config(config)  # the defenses (sampler, weights) and the attack grid
ADDT_VARIANTS = EXPERIMENT.addt_variants
DEFENSES = ["vanilla", *ADDT_VARIANTS]
FAMILY_DEFENSES = EXPERIMENT.family_defenses  # paper 1's other purifier families (families.names)
VOTE_DEFENSES = EXPERIMENT.vote_defenses  # the majority-vote defense (vote.enabled: vanilla_vote)
COMPETITOR_DEFENSES = EXPERIMENT.competitor_defenses  # ADBM, GDMP (competitors.names)
# every defense with a clean evaluation (a competitor trained by an ADDT variant, adbm, is in DEFENSES already)
EVAL_DEFENSES = list(dict.fromkeys([*DEFENSES, *FAMILY_DEFENSES, *VOTE_DEFENSES, *COMPETITOR_DEFENSES]))
OWN_ADDT = EXPERIMENT.own_addt  # family defenses fine-tuned with their own ADDT loss
SANITY_JOBS = battery_jobs(config, EXPERIMENT)  # (defense, threat) of the sanity battery (sanity.enabled)

# keys of every stage's params: runtime settings that change numbers
RUNTIME = dict(seed=config["seed"], device=config["device"], deterministic=config["deterministic"])


def split_files():
    """The data split: data.split_seed, not seed, fixes it, so every replicate seed shares it."""
    return dict(
        train=f"{SHARED_RESULTS}/data/train.npz",
        test=f"{SHARED_RESULTS}/data/test.npz",
        manifest=f"{SHARED_RESULTS}/data/split.json",
    )


def classifier_dir():
    """The classifier: trained per seed, or downloaded once (shared by every replicate seed)."""
    root = SHARED_RESULTS if config["classifier"]["source"] == "download" else RESULTS
    return f"{root}/models/classifier"


def diffusion_dir(defense="vanilla"):
    """A purifier's network: trained per seed (the base DDPM, ADDT variants), or downloaded once
    (diffusion.source download, a family's official network) and shared by every replicate seed.
    A wildcard pattern ("{defense}") gives an input function that decides per job."""
    if "{" in defense:
        return lambda wildcards: diffusion_dir(defense.format(**dict(wildcards.items())))
    downloaded = (defense == "vanilla" and config["diffusion"]["source"] == "download") or defense in EXPERIMENT.networks
    return f"{SHARED_RESULTS if downloaded else RESULTS}/models/diffusion/{defense}"


def all_targets():
    return [
        f"{RESULTS}/tables/clean_accuracy.csv",
        f"{RESULTS}/tables/clean_accuracy.md",
        f"{RESULTS}/tables/p1_table_main.csv",
        f"{RESULTS}/tables/p1_table_main.md",
        f"{RESULTS}/tables/waterfall.csv",  # the robustness waterfall (workflow/rules/tables.smk)
        f"{RESULTS}/tables/waterfall.md",
        *addt_targets(),
        *figure_targets(),
        *paper2_targets(),
        *family_targets(),
        f"{RESULTS}/tables/paper_vs_reproduced.csv",  # workflow/rules/report.smk
        f"{RESULTS}/tables/paper_vs_reproduced.md",
        *([f"{RESULTS}/tables/claims.csv", f"{RESULTS}/tables/claims.md"] if config["claims"]["enabled"] else []),
        *sanity_targets(),
        *replicates_targets(),
    ]


def replicate_config(seed):
    """The config of replicate ``seed``'s module: this run's config with ``seed`` replaced."""
    import copy

    cfg = copy.deepcopy(config)
    cfg["seed"] = seed
    cfg["replicates"] = dict(seeds=[], module_seed=seed)
    return cfg


def replicate_claims(seed):
    """The claims table of one replicate seed (the main run's for the top-level seed)."""
    return f"{RESULTS if seed == config['seed'] else replicate_results(seed)}/tables/claims.csv"


def replicates_targets():
    """claims_replicates.csv (workflow/rules/replicates.smk) when replicates.seeds is set."""
    if not config["replicates"]["seeds"]:
        return []
    return [f"{RESULTS}/tables/claims_replicates.csv", f"{RESULTS}/tables/claims_replicates.md"]


def sanity_targets():
    """The sanity battery's table and figure (workflow/rules/sanity.smk) when sanity.enabled."""
    if not config["sanity"]["enabled"]:
        return []
    return [f"{RESULTS}/tables/sanity.csv", f"{RESULTS}/tables/sanity.md", f"{RESULTS}/figures/sanity.png",
            f"{RESULTS}/figures/sanity.pdf"]


def figure_targets():
    """Paper 1's figures and the robustness waterfall (workflow/rules/figures.smk); Fig. 1 and 2
    need tracked attack paths."""
    figs = ["p1_fig3_robustness_bars", "waterfall"]
    if config["attacks"]["track_images"] > 0:
        figs = ["p1_fig1_attack_trajectories", "p1_fig2_loss_landscape"] + figs
    return [f"{RESULTS}/figures/{name}.{ext}" for name in figs for ext in ("png", "pdf")]


def attack_runs():
    """(defense, threat, setting, attack) of every attack run of paper 1's tables."""
    return EXPERIMENT.attack_runs()


def attack_dir(defense, threat, setting, attack):
    return f"{RESULTS}/attacks/{defense}/{threat}/{setting}/{attack}"


def merged_attack_records():
    return [f"{attack_dir(*r)}/records.parquet" for r in attack_runs()]


def defense_diffusion_input(wildcards):
    """The network of a defense's purifier; the undefended classifier has none."""
    if wildcards.defense == "undefended":
        return []
    return diffusion_dir(EXPERIMENT.defense(wildcards.defense).weights)


def defense_purification_param(wildcards):
    """The purification section of a defense (its family's sampler)."""
    return EXPERIMENT.purification(wildcards.defense)


def defense_attacks_param(wildcards):
    """The attacks section of one attack run, with the run's own n_images (families.n_images for
    the family defenses, attacks.dwbox_n_images for the main sampler's DW-box PGD runs)."""
    return EXPERIMENT.attacks(wildcards.defense, wildcards.setting, wildcards.attack)


def gradient_mode_families():
    """Purifier families of gradient_modes.csv: the main sampler and families.names."""
    return [config["purification"]["sampler"], *config["families"]["names"]]


def family_targets():
    """p1_table_families (families.names) and gradient_modes (workflow/rules/tables.smk, evaluate.smk)."""
    out = [f"{RESULTS}/tables/p1_table_families.csv"] if FAMILY_DEFENSES else []
    if config["families"]["gradient_modes"]["enabled"] and len(gradient_mode_families()) > 1:
        out.append(f"{RESULTS}/tables/gradient_modes.csv")
    return out


def waterfall_run_costs():
    """Steps and network calls per image of every run of p1_table_main (the cost model's count),
    for the robustness waterfall's cells."""
    from dbprepro.paper1.waterfall import run_costs

    return run_costs(config)


def waterfall_stages():
    """The robustness waterfall's stages, weakest first (label, its [attack, setting] runs), from the
    attack registry, which this process has loaded: the table stage then reads no registry."""
    from dbprepro.paper1.waterfall import stage_order

    return [[label, [list(run) for run in runs]] for label, runs in stage_order()]


def family_table_rows():
    """Rows of p1_table_families: the main sampler (defenses vanilla, addt) and every family."""
    main = config["purification"]["sampler"]
    rows = [dict(family=main, weights="vanilla", defense="vanilla")]
    if "addt" in ADDT_VARIANTS:
        rows.append(dict(family=main, weights="addt", defense="addt"))
    for d in FAMILY_DEFENSES:
        defense = EXPERIMENT.defense(d)
        rows.append(dict(family=defense.sampler, weights=defense.weights_kind, defense=d))
    return rows


def addt_targets():
    if not ADDT_VARIANTS:
        return []
    return [
        f"{RESULTS}/tables/addt_training.csv",
        f"{RESULTS}/tables/p1_table_ablation.csv",
        f"{RESULTS}/figures/p1_fig5_rbgm.png",
    ]


def paper2_targets():
    """Paper 2's tables and figures (workflow/rules/paper2.smk)."""
    if not config["analysis"]["enabled"]:
        return []
    tables = ["p2_lp_distances", "p2_randomness", "p2_table_fixed_randomness", "p2_compression",
              "p2_compression_models"]
    figs = ["p2_fig1_lp_distance", "p2_fig2_randomness_correlation", "p2_fig5_compression_spectrum",
            "p2_fig6_compression_vs_robustness"]
    return [f"{RESULTS}/tables/{name}.csv" for name in tables] + [
        f"{RESULTS}/figures/{name}.{ext}" for name in figs for ext in ("png", "pdf")
    ]


def _local_scheduler():
    """Is this the Snakemake process that schedules a local run?  Then heavy jobs go to its warm
    workers (dbprepro.pipeline.workers); a cluster job or a spawned `run:` subprocess runs its stage itself."""
    from snakemake_interface_executor_plugins.settings import ExecMode

    return getattr(workflow, "exec_mode", None) == ExecMode.DEFAULT and getattr(workflow, "local_exec", False)


def _cores():
    try:
        return int(workflow.cores)
    except Exception:  # no --cores (a dry run): the pool sizes itself by the machine
        return None


def run_heavy_stage(name, input, output, params, wildcards, logfiles, threads):
    """Run a heavy stage (training, attacks, evaluations): in a warm worker process of this Snakemake
    process in a local run (force-use-threads, set by profiles/default), in this process on a cluster node."""
    from dbprepro.pipeline.workers import run_heavy

    run_heavy(name, input, output, params, wildcards, logfiles, threads, _cores(), _local_scheduler())


def warm_workers():
    """Snakemake's onstart (Snakefile): start the warm workers while Snakemake starts the first jobs."""
    from dbprepro.pipeline.workers import warm

    warm(_cores(), _local_scheduler())


def run_light_stage(name, input, output, params, wildcards, logfiles):
    """Run a cheap stage (merges, tables, figures) inside the Snakemake process: no interpreter
    start-up per job when `run:` jobs run in threads (force-use-threads, set by profiles/default
    and profiles/slurm).  Heavy stages: run_heavy_stage."""
    from dbprepro.pipeline import run_stage_inline

    run_stage_inline(name, input, output, params, wildcards, logfiles)


P2_CLAIM_TABLES = ("p2_lp_distances", "p2_randomness", "p2_compression", "p2_compression_models")


def claims_records():
    """Every attack run's records for the claims table, paper 2's fixed-configuration runs included."""
    return [f"{attack_dir(*r)}/records.parquet" for r in EXPERIMENT.attack_runs(fixed_configs=True)]


def claims_p2_tables():
    """Paper 2's per-image tables the claims read (none when the analyses are off)."""
    if not config["analysis"]["enabled"]:
        return {}
    return {name: f"{RESULTS}/tables/{name}.csv" for name in P2_CLAIM_TABLES}


def paper_vs_reproduced_inputs():
    """The tables whose numbers stand beside the papers' in paper_vs_reproduced.csv."""
    tables = [f"{RESULTS}/tables/p1_table_main.csv"]
    if config["analysis"]["enabled"]:
        tables += [f"{RESULTS}/tables/{name}.csv" for name in
                   ("p2_table_fixed_randomness", "p2_randomness_summary", "p2_lp_distances_summary")]
    return tables


def sanity_job_param(wildcards):
    """The sanity keys a battery job reads (the table's decision keys and the job lists stay out, so
    changing them reruns no attack); n_images is the defense's (a competing defense's may be fewer)."""
    keep = ("n_images", "pgd_setting", "eps_factors", "iterations_factor", "unbounded_eps", "square", "seed")
    return {**{k: config["sanity"][k] for k in keep}, "n_images": EXPERIMENT.sanity_n_images(wildcards.defense)}


def sanity_records():
    return [f"{RESULTS}/sanity/{d}/{t}/records.parquet" for d, t in SANITY_JOBS]


def sanity_comparisons(wildcards):
    """(randomness class, run) of the attack grid's gradient runs a battery job compares with."""
    return comparison_runs(config, EXPERIMENT, wildcards.defense, wildcards.threat)


def sanity_comparison_records(wildcards):
    return [f"{attack_dir(*r)}/records.parquet" for _, r in sanity_comparisons(wildcards)]


def sanity_comparisons_param(wildcards):
    """(randomness class, run name) of each comparison record, in the order of the input."""
    return [[c, "/".join(r)] for c, r in sanity_comparisons(wildcards)]


def sanity_transfers(wildcards):
    """(source, run) of the adversarial examples a battery job transfers."""
    return transfer_sources(config, EXPERIMENT, wildcards.defense, wildcards.threat)


def sanity_transfer_advs(wildcards):
    return [f"{attack_dir(*r)}/adv.npz" for _, r in sanity_transfers(wildcards)]


def sanity_transfer_param(wildcards):
    return [s for s, _ in sanity_transfers(wildcards)]


def sanity_threat_param(wildcards):
    """The attacks.threat_models entry of a battery job."""
    return threat_model(config["attacks"], wildcards.threat)
