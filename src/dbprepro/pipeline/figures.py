"""Stages: paper 1's loss landscapes, RBGM samples and figures (rules of workflow/rules/figures.smk).

Each function is the rule of the same name; it reads only the rule's ``input``, ``output``,
``params`` and ``wildcards``."""

from __future__ import annotations

from .run import stage_device, stage


@stage
def loss_landscape(input, output, params, wildcards) -> None:
    from ..paper1.landscape import compute_landscapes

    ls = params.landscape
    compute_landscapes(input.classifier, input.diffusion, input.dwbox, input.eot, output.npz,
                       purification=params.purification, variance_type=params.variance_type, seed=params.seed,
                       fixed_draw=params.fixed_draw, n_images=ls["n_images"], grid=ls["grid"],
                       extent_factor=ls["extent_factor"], device=stage_device(params))


@stage
def figure_p1_fig1_attack_trajectories(input, output, params, wildcards) -> None:
    from ..paper1.figures import fig_attack_trajectories

    settings = list(params.settings)
    fig_attack_trajectories(dict(zip(settings, input.paths)), dict(zip(settings, input.traces)),
                            output.png, output.pdf)


@stage
def figure_p1_fig2_loss_landscape(input, output, params, wildcards) -> None:
    from ..paper1.figures import fig_loss_landscape

    fig_loss_landscape(dict(zip(params.defenses, input.npz)), output.png, output.pdf)


@stage
def figure_p1_fig3_robustness_bars(input, output, params, wildcards) -> None:
    from ..paper1.figures import fig_robustness_bars

    fig_robustness_bars(input.table, output.png, output.pdf, threat=params.threat, attack=params.attack,
                        evaluation=params.evaluation, confidence=params.confidence)


@stage
def rbgm_samples(input, output, params, wildcards) -> None:
    from ..addt import rbgm_samples as compute
    from ..data import load_split
    from ..io import savez
    from ..models.classifiers import load_classifier
    from ..models.diffusion import load_diffusion

    a = params.addt
    train = load_split(input.train, input.manifest).head(params.n_images)
    unet, scheduler = load_diffusion(input.base)
    out = compute(unet, scheduler, load_classifier(input.classifier), train.images, train.labels, t=params.t,
                  iterations=a["cgpo_iterations"], lambda_scale=a["lambda_scale"], lambda_max=a["lambda_max"],
                  seed=params.seed)
    savez(output.npz, **out)


@stage
def figure_p1_fig5_rbgm(input, output, params, wildcards) -> None:
    from ..paper1.figures import fig_rbgm

    fig_rbgm(input.npz, output.png, output.pdf)


@stage
def figure_waterfall(input, output, params, wildcards) -> None:
    from ..paper1.waterfall_figure import fig_waterfall

    fig_waterfall(input.table, output.png, output.pdf, confidence=params.confidence)
