# dbprepro: the whole reproduction as one DAG.
#   snakemake --cores all                                  embedded default (config.yaml, digits)
#   snakemake --cores all --configfile config/smoke.yaml    CI-sized run (overlays config.yaml)
#   snakemake results/tables/clean_accuracy.csv            one target and only what it needs
#   snakemake --cores all --configfile config/replicates.yaml   + replicate training seeds (claims_replicates.csv)
# Rules live in workflow/rules/ by pipeline stage; all logic is in the dbprepro package.

configfile: "config.yaml"


# snakemake --report results/report.html: every figure and table with its caption (workflow/report/)
report: "workflow/report/workflow.rst"


include: "workflow/rules/common.smk"


wildcard_constraints:
    defense=r"[a-z0-9_]+",
    threat=r"[a-z0-9_]+",
    setting=r"whitebox|whitebox_eot|dwbox|dwbox_c(0|[1-9][0-9]*)|none",
    attack="|".join(ATTACK_NAMES),  # the registered attacks (dbprepro.attacks.ATTACKS)
    shard=r"\d+",


include: "workflow/rules/data.smk"
include: "workflow/rules/models.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/attacks.smk"
include: "workflow/rules/tables.smk"
include: "workflow/rules/figures.smk"
include: "workflow/rules/paper2.smk"
include: "workflow/rules/report.smk"
include: "workflow/rules/sanity.smk"
include: "workflow/rules/reproduce.smk"  # compare_runs: an explicit target, not in all
include: "workflow/rules/replicates.smk"  # replicates.seeds: a module per extra seed


onstart:
    warm_workers()  # heavy jobs run in warm worker processes (dbprepro.pipeline.workers); start them now


rule all:
    default_target: True
    localrule: True
    input:
        all_targets(),
