# Each rule below runs the function of its name in src/dbprepro/pipeline/paper2.py.
# Stage 6: paper 2 (Liu & Wei, arXiv 2505.22839) - l_p distances, randomness dominance, robustness
# under fixed randomness, compression rate.  All on the first analysis.n_images attacked images of
# one threat model.  Robustness under fixed randomness reuses the attack rule: setting dwbox_c<k>
# attacks fixed configuration k (configuration attacks.fixed_draw is the plain dwbox run).

from dbprepro.config import analysis_threat, fixed_setting_name, threat_model

P2 = config["analysis"]
P2_THREAT = analysis_threat(config)
P2_RADIUS = P2["radius"] if P2["radius"] is not None else threat_model(config["attacks"], P2_THREAT)["eps"]
P2_FIXED_DRAW = config["attacks"]["fixed_draw"]
P2_CONFIGS = list(range(P2["fixed_configs"]))
P2_FIXED_SETTINGS = [fixed_setting_name(k, P2_FIXED_DRAW) for k in P2_CONFIGS]
# defenses compared by compression rate: vanilla + the ADDT defenses with a dwbox run on P2_THREAT
# (P2_EOT_DEFENSES: those of them with a whitebox_eot run too)
# (paper 1's ADDT variants: a competing defense trained by a variant, adbm, stays out of paper 2's analyses)
_ADDT_ON_THREAT = ([v for v in ADDT_VARIANTS if not EXPERIMENT.defense(v).competitor]
                   if P2_THREAT in config["addt"]["attack_threat_models"] else [])
P2_MODEL_DEFENSES = ["vanilla"] + [v for v in _ADDT_ON_THREAT if "dwbox" in EXPERIMENT.addt_settings(v)]
P2_EOT_DEFENSES = ["vanilla"] + [v for v in P2_MODEL_DEFENSES[1:] if "whitebox_eot" in EXPERIMENT.addt_settings(v)]
P2_PURIFY = dict(
    purification=EXPERIMENT.main_purification(),
    variance_type=config["diffusion"]["schedule"]["variance_type"],
)


rule p2_lp_distances:
    input:
        diffusion=diffusion_dir("vanilla"),
        adv=f"{attack_dir('vanilla', P2_THREAT, 'whitebox_eot', 'pgd')}/adv.npz",
        **split_files(),
    output:
        csv=report(
            f"{RESULTS}/tables/p2_lp_distances.csv",
            caption="../report/p2_lp_distances.rst",
            category="Paper 2",
            subcategory="Distances and randomness",
            labels={"result": "Fig. 1 data: lp distances per image"},
        ),
        summary=report(
            f"{RESULTS}/tables/p2_lp_distances_summary.csv",
            caption="../report/p2_lp_distances_summary.rst",
            category="Paper 2",
            subcategory="Distances and randomness",
            labels={"result": "Fig. 1 summary: lp distances"},
        ),
        chain=f"{RESULTS}/analysis/p2/lp_chain.parquet",
    params:
        analysis=P2,
        **P2_PURIFY,
        **RUNTIME,
    log:
        f"{LOGS}/p2_lp_distances.log",
    benchmark:
        f"{RESULTS}/benchmarks/p2_lp_distances.tsv"
    threads: 1
    resources:
        gpu=1,
        mem_mb=4000,
        runtime="1h",
    run:
        run_heavy_stage(rule, input, output, params, wildcards, log, threads)


rule figure_p2_fig1_lp_distance:
    input:
        csv=f"{RESULTS}/tables/p2_lp_distances.csv",
        chain=f"{RESULTS}/analysis/p2/lp_chain.parquet",
    output:
        png=report(
            f"{RESULTS}/figures/p2_fig1_lp_distance.png",
            caption="../report/p2_fig1_lp_distance.rst",
            category="Paper 2",
            subcategory="Distances and randomness",
            labels={"result": "Fig. 1: lp distances"},
        ),
        pdf=f"{RESULTS}/figures/p2_fig1_lp_distance.pdf",
    params:
        **RUNTIME,
    log:
        f"{LOGS}/figure_p2_fig1_lp_distance.log",
    threads: 1
    resources:
        mem_mb=2000,
        runtime="10m",
    localrule: True
    run:
        run_light_stage(rule, input, output, params, wildcards, log)


rule p2_randomness:
    input:
        diffusion=diffusion_dir("vanilla"),
        **split_files(),
    output:
        csv=report(
            f"{RESULTS}/tables/p2_randomness.csv",
            caption="../report/p2_randomness.rst",
            category="Paper 2",
            subcategory="Distances and randomness",
            labels={"result": "Fig. 2 data: correlations per image"},
        ),
        summary=report(
            f"{RESULTS}/tables/p2_randomness_summary.csv",
            caption="../report/p2_randomness_summary.rst",
            category="Paper 2",
            subcategory="Distances and randomness",
            labels={"result": "Fig. 2 summary: correlations"},
        ),
        example=f"{RESULTS}/analysis/p2/randomness_example.npz",
    params:
        analysis=P2,
        radius=P2_RADIUS,
        fixed_draw=P2_FIXED_DRAW,
        **P2_PURIFY,
        **RUNTIME,
    log:
        f"{LOGS}/p2_randomness.log",
    benchmark:
        f"{RESULTS}/benchmarks/p2_randomness.tsv"
    threads: 1
    resources:
        gpu=1,
        mem_mb=4000,
        runtime="2h",
    run:
        run_heavy_stage(rule, input, output, params, wildcards, log, threads)


rule figure_p2_fig2_randomness_correlation:
    input:
        csv=f"{RESULTS}/tables/p2_randomness.csv",
        example=f"{RESULTS}/analysis/p2/randomness_example.npz",
    output:
        png=report(
            f"{RESULTS}/figures/p2_fig2_randomness_correlation.png",
            caption="../report/p2_fig2_randomness_correlation.rst",
            category="Paper 2",
            subcategory="Distances and randomness",
            labels={"result": "Fig. 2: randomness correlation"},
        ),
        pdf=f"{RESULTS}/figures/p2_fig2_randomness_correlation.pdf",
    params:
        **RUNTIME,
    log:
        f"{LOGS}/figure_p2_fig2_randomness_correlation.log",
    threads: 1
    resources:
        mem_mb=2000,
        runtime="10m",
    localrule: True
    run:
        run_light_stage(rule, input, output, params, wildcards, log)


rule table_p2_fixed_randomness:
    input:
        undefended=f"{attack_dir('undefended', P2_THREAT, 'none', 'pgd')}/records.parquet",
        random=f"{attack_dir('vanilla', P2_THREAT, 'whitebox_eot', 'pgd')}/records.parquet",
        fixed=[f"{attack_dir('vanilla', P2_THREAT, s, 'pgd')}/records.parquet" for s in P2_FIXED_SETTINGS],
    output:
        csv=report(
            f"{RESULTS}/tables/p2_table_fixed_randomness.csv",
            caption="../report/p2_table_fixed_randomness.rst",
            category="Paper 2",
            subcategory="Fixed randomness",
            labels={"result": "Robustness gain under fixed randomness"},
        ),
        md=f"{RESULTS}/tables/p2_table_fixed_randomness.md",
    params:
        configs=P2_CONFIGS,
        n_images=P2["n_images"],
        evaluation=P2["evaluation"],
        confidence=config["evaluation"]["confidence"],
        **RUNTIME,
    log:
        f"{LOGS}/table_p2_fixed_randomness.log",
    threads: 1
    resources:
        mem_mb=2000,
        runtime="10m",
    localrule: True
    run:
        run_light_stage(rule, input, output, params, wildcards, log)


rule p2_compression:
    input:
        classifier=classifier_dir(),
        diffusion=diffusion_dir("{defense}"),
        **split_files(),
    output:
        records=f"{RESULTS}/analysis/p2/compression/{{defense}}.parquet",
        jacobian=f"{RESULTS}/analysis/p2/compression/{{defense}}_jacobian.npz",
    wildcard_constraints:
        defense="|".join(P2_MODEL_DEFENSES),
    params:
        # vanilla: every fixed configuration (paired with its dwbox_c<k> run); the other
        # defenses: the configuration of their dwbox run
        configs=lambda wc: P2_CONFIGS if wc.defense == "vanilla" else [P2_FIXED_DRAW],
        analysis=P2,
        radius=P2_RADIUS,
        **P2_PURIFY,
        **RUNTIME,
    log:
        f"{LOGS}/p2_compression/{{defense}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/p2_compression/{{defense}}.tsv"
    threads: 1
    resources:
        gpu=1,
        mem_mb=4000,
        runtime="2h",
    run:
        run_heavy_stage(rule, input, output, params, wildcards, log, threads)


rule table_p2_compression:
    input:
        records=f"{RESULTS}/analysis/p2/compression/vanilla.parquet",
        dwbox=[f"{attack_dir('vanilla', P2_THREAT, s, 'pgd')}/records.parquet" for s in P2_FIXED_SETTINGS],
    output:
        csv=report(
            f"{RESULTS}/tables/p2_compression.csv",
            caption="../report/p2_compression.rst",
            category="Paper 2",
            subcategory="Compression",
            labels={"result": "Fig. 6 data: compression rate per image"},
        ),
        summary=report(
            f"{RESULTS}/tables/p2_compression_summary.csv",
            caption="../report/p2_compression_summary.rst",
            category="Paper 2",
            subcategory="Compression",
            labels={"result": "Fig. 6 summary: CR vs robustness"},
        ),
        md=f"{RESULTS}/tables/p2_compression_summary.md",
    params:
        configs=P2_CONFIGS,
        settings=P2_FIXED_SETTINGS,
        **RUNTIME,
    log:
        f"{LOGS}/table_p2_compression.log",
    threads: 1
    resources:
        mem_mb=2000,
        runtime="10m",
    localrule: True
    run:
        run_light_stage(rule, input, output, params, wildcards, log)


rule table_p2_compression_models:
    input:
        records=expand(f"{RESULTS}/analysis/p2/compression/{{defense}}.parquet", defense=P2_MODEL_DEFENSES),
        dwbox=[f"{attack_dir(d, P2_THREAT, 'dwbox', 'pgd')}/records.parquet" for d in P2_MODEL_DEFENSES],
        eot=[f"{attack_dir(d, P2_THREAT, 'whitebox_eot', 'pgd')}/records.parquet" for d in P2_EOT_DEFENSES],
    output:
        csv=report(
            f"{RESULTS}/tables/p2_compression_models.csv",
            caption="../report/p2_compression_models.rst",
            category="Paper 2",
            subcategory="Compression",
            labels={"result": "Compression across defenses"},
        ),
        md=f"{RESULTS}/tables/p2_compression_models.md",
    params:
        defenses=P2_MODEL_DEFENSES,
        eot_defenses=P2_EOT_DEFENSES,
        fixed_draw=P2_FIXED_DRAW,
        evaluation=P2["evaluation"],
        **RUNTIME,
    log:
        f"{LOGS}/table_p2_compression_models.log",
    threads: 1
    resources:
        mem_mb=2000,
        runtime="10m",
    localrule: True
    run:
        run_light_stage(rule, input, output, params, wildcards, log)


rule figure_p2_fig5_compression_spectrum:
    input:
        jacobian=expand(f"{RESULTS}/analysis/p2/compression/{{defense}}_jacobian.npz", defense=P2_MODEL_DEFENSES),
    output:
        png=report(
            f"{RESULTS}/figures/p2_fig5_compression_spectrum.png",
            caption="../report/p2_fig5_compression_spectrum.rst",
            category="Paper 2",
            subcategory="Compression",
            labels={"result": "Fig. 5c: Jacobian spectrum"},
        ),
        pdf=f"{RESULTS}/figures/p2_fig5_compression_spectrum.pdf",
    params:
        defenses=P2_MODEL_DEFENSES,
        **RUNTIME,
    log:
        f"{LOGS}/figure_p2_fig5_compression_spectrum.log",
    threads: 1
    resources:
        mem_mb=2000,
        runtime="10m",
    localrule: True
    run:
        run_light_stage(rule, input, output, params, wildcards, log)


rule figure_p2_fig6_compression_vs_robustness:
    input:
        csv=f"{RESULTS}/tables/p2_compression.csv",
        summary=f"{RESULTS}/tables/p2_compression_summary.csv",
        models=f"{RESULTS}/tables/p2_compression_models.csv",
    output:
        png=report(
            f"{RESULTS}/figures/p2_fig6_compression_vs_robustness.png",
            caption="../report/p2_fig6_compression_vs_robustness.rst",
            category="Paper 2",
            subcategory="Compression",
            labels={"result": "Fig. 6: compression vs robustness"},
        ),
        pdf=f"{RESULTS}/figures/p2_fig6_compression_vs_robustness.pdf",
    params:
        **RUNTIME,
    log:
        f"{LOGS}/figure_p2_fig6_compression_vs_robustness.log",
    threads: 1
    resources:
        mem_mb=2000,
        runtime="10m",
    localrule: True
    run:
        run_light_stage(rule, input, output, params, wildcards, log)
