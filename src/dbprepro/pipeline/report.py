"""Stages: the papers' numbers beside the reproduced ones (rules of workflow/rules/report.smk).

Each function is the rule of the same name; it reads only the rule's ``input``, ``output``,
``params`` and ``wildcards``."""

from __future__ import annotations

from pathlib import Path

from .run import stage


@stage
def paper_vs_reproduced(input, output, params, wildcards) -> None:
    from ..reference import write_paper_vs_reproduced

    # the reproduced values come from the tables beside the output (results/tables)
    write_paper_vs_reproduced(str(Path(output.csv).parent), output.csv, output.md, params.dataset, params.name)
