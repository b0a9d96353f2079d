"""Stages: the sanity battery (rules of workflow/rules/sanity.smk).

Each function is the rule of the same name; it reads only the rule's ``input``, ``output``,
``params`` and ``wildcards``."""

from __future__ import annotations

from .run import stage, stage_device


@stage
def sanity(input, output, params, wildcards) -> None:
    from ..sanity.runner import run_battery

    comparisons = [(c, name, path) for (c, name), path in zip(params.comparisons, input.comparisons)]
    transfers = list(zip(params.transfer_sources, input.transfer))
    run_battery(input.classifier, input.get("diffusion"), input.test, input.manifest, output.records,
                defense=wildcards.defense, threat=wildcards.threat, tm=dict(params.threat_model), pgd=dict(params.pgd),
                fixed_draw=params.fixed_draw, sanity=dict(params.sanity), purification=dict(params.purification),
                variance_type=params.variance_type, batch_size=params.batch_size, seed=params.seed,
                comparisons=comparisons, transfers=transfers, device=stage_device(params))


@stage
def table_sanity(input, output, params, wildcards) -> None:
    from ..sanity.table import write_sanity_table

    write_sanity_table(list(input.records), output.csv, output.md, max_final_accuracy=params.max_final_accuracy,
                       confidence=params.confidence, resamples=params.resamples, seed=params.seed_bootstrap)


@stage
def figure_sanity(input, output, params, wildcards) -> None:
    from ..sanity.figure import write_sanity_figure

    write_sanity_figure(input.table, list(input.records), output.png, output.pdf, confidence=params.confidence)
