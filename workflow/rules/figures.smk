# Each rule below runs the function of its name in src/dbprepro/pipeline/figures.py.
# Stage 5: paper 1's figures, from the attack runs of the first configured threat model (PGD).
# The trajectory and landscape figures use the tracked images' paths (attacks.track_images >= 1).

FIG_THREAT = config["attacks"]["threat_models"][0]["name"]
LANDSCAPE_DEFENSES = ["vanilla"] + (["addt"] if "addt" in ADDT_VARIANTS else [])  # paper 1: vanilla vs ADDT
FIG_SETTINGS = ["whitebox", "whitebox_eot", "dwbox"]  # Fig. 1 compares all three, whatever attacks.settings


rule loss_landscape:
    input:
        classifier=classifier_dir(),
        diffusion=diffusion_dir("{defense}"),
        dwbox=f"{attack_dir('{defense}', FIG_THREAT, 'dwbox', 'pgd')}/paths.npz",
        eot=f"{attack_dir('{defense}', FIG_THREAT, 'whitebox_eot', 'pgd')}/paths.npz",
    output:
        npz=f"{RESULTS}/landscape/{{defense}}.npz",
    params:
        landscape=config["attacks"]["landscape"],
        fixed_draw=config["attacks"]["fixed_draw"],
        purification=EXPERIMENT.main_purification(),
        variance_type=config["diffusion"]["schedule"]["variance_type"],
        **RUNTIME,
    log:
        f"{LOGS}/loss_landscape/{{defense}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/loss_landscape/{{defense}}.tsv"
    threads: 1
    resources:
        gpu=1,
        mem_mb=8000,
        runtime="2h",
    run:
        run_heavy_stage(rule, input, output, params, wildcards, log, threads)


rule figure_p1_fig1_attack_trajectories:
    input:
        paths=[f"{attack_dir('vanilla', FIG_THREAT, s, 'pgd')}/paths.npz" for s in FIG_SETTINGS],
        traces=[f"{attack_dir('vanilla', FIG_THREAT, s, 'pgd')}/trace.parquet" for s in FIG_SETTINGS],
    output:
        png=report(
            f"{RESULTS}/figures/p1_fig1_attack_trajectories.png",
            caption="../report/p1_fig1_attack_trajectories.rst",
            category="Paper 1",
            subcategory="Robustness",
            labels={"result": "Fig. 1: attack trajectories"},
        ),
        pdf=f"{RESULTS}/figures/p1_fig1_attack_trajectories.pdf",
    params:
        settings=FIG_SETTINGS,
        **RUNTIME,
    log:
        f"{LOGS}/figure_p1_fig1_attack_trajectories.log",
    threads: 1
    resources:
        mem_mb=2000,
        runtime="10m",
    localrule: True
    run:
        run_light_stage(rule, input, output, params, wildcards, log)


rule figure_p1_fig2_loss_landscape:
    input:
        npz=expand(f"{RESULTS}/landscape/{{defense}}.npz", defense=LANDSCAPE_DEFENSES),
    output:
        png=report(
            f"{RESULTS}/figures/p1_fig2_loss_landscape.png",
            caption="../report/p1_fig2_loss_landscape.rst",
            category="Paper 1",
            subcategory="Robustness",
            labels={"result": "Fig. 2-3: loss landscapes"},
        ),
        pdf=f"{RESULTS}/figures/p1_fig2_loss_landscape.pdf",
    params:
        defenses=LANDSCAPE_DEFENSES,
        **RUNTIME,
    log:
        f"{LOGS}/figure_p1_fig2_loss_landscape.log",
    threads: 1
    resources:
        mem_mb=2000,
        runtime="10m",
    localrule: True
    run:
        run_light_stage(rule, input, output, params, wildcards, log)


rule figure_p1_fig3_robustness_bars:
    input:
        table=f"{RESULTS}/tables/p1_table_main.csv",
    output:
        png=report(
            f"{RESULTS}/figures/p1_fig3_robustness_bars.png",
            caption="../report/p1_fig3_robustness_bars.rst",
            category="Paper 1",
            subcategory="Robustness",
            labels={"result": "Fig. 2-3 bars: robust accuracy"},
        ),
        pdf=f"{RESULTS}/figures/p1_fig3_robustness_bars.pdf",
    params:
        threat=FIG_THREAT,
        attack="pgd",
        evaluation="single",
        confidence=config["evaluation"]["confidence"],
        **RUNTIME,
    log:
        f"{LOGS}/figure_p1_fig3_robustness_bars.log",
    threads: 1
    resources:
        mem_mb=2000,
        runtime="10m",
    localrule: True
    run:
        run_light_stage(rule, input, output, params, wildcards, log)


rule rbgm_samples:
    input:
        base=diffusion_dir("vanilla"),
        classifier=classifier_dir(),
        **split_files(),
    output:
        npz=f"{RESULTS}/addt/rbgm_samples.npz",
    params:
        addt=config["addt"],
        n_images=64,
        t=int(round(config["purification"]["t_star"] * config["diffusion"]["schedule"]["num_train_timesteps"])),
        **RUNTIME,
    log:
        f"{LOGS}/rbgm_samples.log",
    threads: 1
    resources:
        mem_mb=4000,
        runtime="30m",
    run:
        run_heavy_stage(rule, input, output, params, wildcards, log, threads)


rule figure_p1_fig5_rbgm:
    input:
        npz=f"{RESULTS}/addt/rbgm_samples.npz",
    output:
        png=report(
            f"{RESULTS}/figures/p1_fig5_rbgm.png",
            caption="../report/p1_fig5_rbgm.rst",
            category="Paper 1",
            subcategory="ADDT",
            labels={"result": "Fig. 5: RBGM"},
        ),
        pdf=f"{RESULTS}/figures/p1_fig5_rbgm.pdf",
    params:
        **RUNTIME,
    log:
        f"{LOGS}/figures/p1_fig5_rbgm.log",
    threads: 1
    resources:
        mem_mb=2000,
        runtime="10m",
    localrule: True
    run:
        run_light_stage(rule, input, output, params, wildcards, log)


rule figure_waterfall:
    input:
        table=f"{RESULTS}/tables/waterfall.csv",
    output:
        png=report(
            f"{RESULTS}/figures/waterfall.png",
            caption="../report/waterfall.png.rst",
            category="Overview",
            subcategory="Robustness waterfall",
            labels={"result": "Robustness waterfall per defense (figure)"},
        ),
        pdf=f"{RESULTS}/figures/waterfall.pdf",
    params:
        confidence=config["evaluation"]["confidence"],
        **RUNTIME,
    log:
        f"{LOGS}/figure_waterfall.log",
    threads: 1
    resources:
        mem_mb=2000,
        runtime="10m",
    localrule: True
    run:
        run_light_stage(rule, input, output, params, wildcards, log)
