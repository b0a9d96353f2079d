"""Stages: clean evaluation and the gradient-mode comparison (rules of workflow/rules/evaluate.smk).

Each function is the rule of the same name; it reads only the rule's ``input``, ``output``,
``params`` and ``wildcards``."""

from __future__ import annotations

from .run import log, stage_device, stage


@stage
def evaluate_clean(input, output, params, wildcards) -> None:
    from ..evaluation import evaluate_clean as run

    run(input.classifier, input.diffusion, input.test, input.manifest, output.records,
        n_test=params.n_test, purification=params.purification, variance_type=params.variance_type,
        evaluation=params.evaluation, seed=params.seed, device=stage_device(params))


@stage
def gradient_modes(input, output, params, wildcards) -> None:
    """Time and agreement of the gradient modes of every purifier family in ``params.families``
    (the base ``params.purification`` with its sampler replaced), on the first ``params.n_images``
    test images in fixed randomness (draw 0)."""
    import pandas as pd

    from ..data import load_split
    from ..purifiers import DefendedClassifier, load_purifier
    from ..purifiers.gradients import compare_gradient_modes
    from ..metrics import write_table
    from ..models.classifiers import load_classifier
    from ..randomness import Randomness

    device = stage_device(params)
    test = load_split(input.test, input.manifest).head(int(params.n_images))
    x, y, ids = test.images.to(device), test.labels.to(device), test.ids
    classifier = load_classifier(input.classifier).to(device)
    tables = []
    for family in params.families:
        # grad_mode "exact" only to build it (an adjoint in the base section is refused by the other families)
        pur = {**params.purification, "sampler": family, "grad_mode": "exact"}
        purifier = load_purifier(input.diffusion, pur, params.variance_type, Randomness(params.seed, "fixed", 0),
                                  device)
        table = compare_gradient_modes(DefendedClassifier(classifier, purifier), x, y, ids,
                                       repeats=int(params.repeats))
        for _, r in table.iterrows():
            log.info("%-6s %-10s %4d calls: %.3f s, rel. error vs exact %.2e, cosine %.6f", r["family"],
                     r["grad_mode"], r["steps"], r["seconds"], r["rel_error_vs_exact"], r["cosine_vs_exact"])
        tables.append(table)
    table = pd.concat(tables, ignore_index=True)
    # wall time is not reproducible byte for byte: it goes to a benchmark file beside the table
    key = ["family", "grad_mode", "steps", "n_images"]
    write_table(table.drop(columns="seconds"), output.csv, decimals=8)
    write_table(table[[*key, "seconds"]], output.seconds, decimals=4)
