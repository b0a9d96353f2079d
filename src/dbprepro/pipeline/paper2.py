"""Stages: paper 2's analyses, tables and figures (rules of workflow/rules/paper2.smk).

Each function is the rule of the same name; it reads only the rule's ``input``, ``output``,
``params`` and ``wildcards``."""

from __future__ import annotations

from .run import log, stage_device, stage


@stage
def p2_lp_distances(input, output, params, wildcards) -> None:
    from ..paper2.distances import run_lp_distances

    an = params.analysis
    run_lp_distances(input.diffusion, input.test, input.manifest, input.adv, per_image_csv=output.csv,
                     summary_csv=output.summary, chain_out=output.chain, n_images=an["n_images"],
                     draws=an["distances"]["draws"], chain_draws=an["distances"]["chain_draws"],
                     batch_size=an["batch_size"], purification=params.purification,
                     variance_type=params.variance_type, seed=params.seed, device=stage_device(params))


@stage
def figure_p2_fig1_lp_distance(input, output, params, wildcards) -> None:
    from ..paper2.figures import fig_p2_lp_distance

    fig_p2_lp_distance(input.csv, input.chain, output.png, output.pdf)


@stage
def p2_randomness(input, output, params, wildcards) -> None:
    from ..paper2.dominance import run_randomness

    an = params.analysis
    run_randomness(input.diffusion, input.test, input.manifest, per_image_csv=output.csv, summary_csv=output.summary,
                   example_out=output.example, n_images=an["n_images"], samples=an["randomness"]["samples"],
                   same_draw=params.fixed_draw, distribution=an["distribution"], radius=params.radius,
                   batch_size=an["batch_size"], purification=params.purification, variance_type=params.variance_type,
                   seed=params.seed, device=stage_device(params))


@stage
def figure_p2_fig2_randomness_correlation(input, output, params, wildcards) -> None:
    from ..paper2.figures import fig_p2_randomness

    fig_p2_randomness(input.csv, input.example, output.png, output.pdf)


@stage
def table_p2_fixed_randomness(input, output, params, wildcards) -> None:
    from ..paper2.fixed_randomness import write_p2_fixed_randomness_table

    write_p2_fixed_randomness_table(input.undefended, input.random, list(input.fixed), list(params.configs),
                                    output.csv, output.md, n_images=params.n_images, evaluation=params.evaluation,
                                    confidence=params.confidence)


@stage
def p2_compression(input, output, params, wildcards) -> None:
    from ..paper2.compression import run_compression

    an, comp = params.analysis, params.analysis["compression"]
    run_compression(input.classifier, input.diffusion, input.test, input.manifest, records_out=output.records,
                    jacobian_out=output.jacobian, defense=wildcards.defense, configs=list(params.configs),
                    n_images=an["n_images"], probes=comp["probes"], norm=comp["norm"],
                    distribution=an["distribution"], radius=params.radius, jacobian_images=comp["jacobian_images"],
                    batch_size=an["batch_size"], purification=params.purification,
                    variance_type=params.variance_type, seed=params.seed, device=stage_device(params))


@stage
def table_p2_compression(input, output, params, wildcards) -> None:
    import pandas as pd

    from ..paper2.compression_stats import compression_table
    from ..metrics import write_table

    dwbox = {int(k): pd.read_parquet(p) for k, p in zip(params.configs, input.dwbox)}
    per_image, summary = compression_table(pd.read_parquet(input.records), dwbox)
    per_image.insert(4, "attack_setting", per_image["config"].map(dict(zip(params.configs, params.settings))))
    write_table(per_image, output.csv, decimals=6)
    write_table(summary, output.summary, output.md)
    for _, r in summary.iterrows():
        log.info("%-14s n=%d: Spearman(CR, robust) %.3f, AUC(low CR -> robust) %.3f", r["scope"], r["n"],
                 r["spearman_rho"], r["auc_low_cr_robust"])


@stage
def table_p2_compression_models(input, output, params, wildcards) -> None:
    import pandas as pd

    from ..paper2.compression_stats import compression_models_table
    from ..metrics import write_table

    defenses = list(params.defenses)
    cr = {d: pd.read_parquet(p) for d, p in zip(defenses, input.records)}
    cr = {d: df[df["config"] == params.fixed_draw] for d, df in cr.items()}
    dwbox = {d: pd.read_parquet(p) for d, p in zip(defenses, input.dwbox)}
    eot = {d: pd.read_parquet(p) for d, p in zip(params.eot_defenses, input.eot)}
    table = compression_models_table(cr, dwbox, eot, evaluation=params.evaluation)
    write_table(table, output.csv, output.md)
    for _, r in table.iterrows():
        log.info("%-16s mean CR %.4f, dwbox robust accuracy %.4f", r["defense"], r["mean_cr"], r["robust_accuracy_dwbox"])


@stage
def figure_p2_fig5_compression_spectrum(input, output, params, wildcards) -> None:
    from ..paper2.figures import fig_p2_compression_spectrum

    fig_p2_compression_spectrum(dict(zip(params.defenses, input.jacobian)), output.png, output.pdf)


@stage
def figure_p2_fig6_compression_vs_robustness(input, output, params, wildcards) -> None:
    from ..paper2.figures import fig_p2_compression_vs_robustness

    fig_p2_compression_vs_robustness(input.csv, input.summary, input.models, output.png, output.pdf)
