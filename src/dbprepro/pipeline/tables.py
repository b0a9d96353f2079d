"""Stages: paper 1's tables, the robustness waterfall and the clean-accuracy table (rules of
workflow/rules/tables.smk).

Each function is the rule of the same name; it reads only the rule's ``input``, ``output``,
``params`` and ``wildcards``."""

from __future__ import annotations

from .run import stage


@stage
def table_clean_accuracy(input, output, params, wildcards) -> None:
    from ..evaluation import write_clean_accuracy_table

    write_clean_accuracy_table(list(input.records), output.csv, output.md,
                               confidence=params.confidence, defenses=list(params.defenses))


@stage
def table_p1_main(input, output, params, wildcards) -> None:
    from ..paper1.tables import write_p1_main_table

    write_p1_main_table(list(input.records), list(input.clean), list(params.defenses), output.csv, output.md,
                        confidence=params.confidence, fixed_draw=params.fixed_draw)


@stage
def table_addt_training(input, output, params, wildcards) -> None:
    from ..paper1.tables import write_addt_training_table

    write_addt_training_table(list(input.history), list(input.timing), output.csv, output.md, output.cost)


@stage
def table_p1_ablation(input, output, params, wildcards) -> None:
    from ..paper1.tables import write_p1_ablation_table

    write_p1_ablation_table(input.main, output.csv, output.md, defenses=list(params.defenses),
                            threat=params.threat, families=dict(params.families))


@stage
def table_p1_families(input, output, params, wildcards) -> None:
    from ..paper1.tables import write_p1_families_table

    write_p1_families_table(input.main, output.csv, output.md, rows=list(params.rows), threat=params.threat,
                            settings=tuple(params.settings))


@stage
def table_waterfall(input, output, params, wildcards) -> None:
    from ..paper1.waterfall import write_waterfall_table

    write_waterfall_table(list(input.records), output.csv, output.md, costs=list(params.costs),
                          defenses=list(params.defenses), confidence=params.confidence, resamples=params.resamples,
                          seed=params.seed, stages=params.stages)
