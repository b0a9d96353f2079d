"""Stage: the reproduction check of the run against a recorded one (rule of workflow/rules/reproduce.smk).

The function reads only the rule's ``input``, ``output`` and ``params``."""

from __future__ import annotations

from pathlib import Path

from .run import log, stage


@stage
def compare_runs(input, output, params, wildcards) -> None:
    from ..reproduce import Tolerance, compare_runs as compare, write_reports
    from ..reproduce.report import markdown

    t = params.tolerance
    tol = Tolerance(atol=t["atol"], rtol=t["rtol"], flip_images=t["flip_images"], flip_share=t["flip_share"],
                    alpha=params.alpha)
    cmp = compare(input.recorded, str(Path(output.csv).parents[1]), tol)  # results/reproduction -> results
    write_reports(cmp, output.csv, output.md, output.cells)
    log.info("reproduction check against %s: %s\n%s", input.recorded, cmp.verdict, markdown(cmp))
    if not cmp.ok and t["fail"]:
        named = "; ".join(f"{section} {name}: {status}" for section, name, status in cmp.failures)
        raise RuntimeError(f"the run does not reproduce {input.recorded} within noise ({named}); the report is in "
                           f"the log (reproduction.fail: false keeps the reports and lets the job succeed)")
