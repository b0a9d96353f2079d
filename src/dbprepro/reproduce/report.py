"""The reproduction check's reports: ``compare.csv`` (one row per table, attack run and claim),
``compare_cells.csv`` (every table cell that moved, with the rule that admitted it) and
``compare.md`` (Markdown without a title, its sections at a chosen heading level, so that a
document can include it verbatim).

``compare.csv``'s counts: for a table, ``n`` rows of which ``identical`` / ``within_tolerance`` /
``different``; for an attack run, ``n`` images of which ``different`` flipped their headline outcome
(``correct_single``) and ``identical`` did not (every outcome column in ``detail``); a claim has its
estimates, intervals and verdicts in ``detail``."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from .compare import Comparison
from .tolerance import DIFFERENT, FAILING, IDENTICAL, ONLY_NEW, WITHIN

SUMMARY_COLUMNS = ["section", "item", "status", "n", "identical", "within_tolerance", "different", "detail"]
CELL_COLUMNS = ["table", "row", "row_status", "column", "recorded", "new", "rule"]


def _f(x: float) -> str:
    return "" if x != x else f"{x:.4f}"


def _claim_text(d: dict) -> str:
    if not d:
        return ""
    ci = f" [{_f(d['ci_low'])}, {_f(d['ci_high'])}]" if d["ci_low"] == d["ci_low"] else ""
    return f"{_f(d['estimate'])}{ci}"


def summary_frame(cmp: Comparison) -> pd.DataFrame:
    rows = []
    for t in cmp.tables:
        named = [d.describe() for d in t.diffs if d.status != WITHIN]
        detail = "; ".join(t.notes + ([f"key: {', '.join(t.key)}"] if t.key and t.diffs else []) + named)
        rows.append(dict(section="table", item=t.name, status=t.status, n=t.rows, identical=t.identical,
                         within_tolerance=t.within, different=t.different, detail=detail))
    for r in cmp.runs:
        flips = ", ".join(f"{c} {v:g}" for c, v in r.flips.items())
        detail = "; ".join(r.notes + ([f"flipped: {flips} (allowed {r.allowed:g})"] if r.flips else []))
        main = r.main_flips if r.flips else float("nan")
        rows.append(dict(section="attack run", item=r.run, status=r.status, n=r.n or None,
                         identical=r.n - main if r.flips else None, within_tolerance=None,
                         different=main if r.flips else None, detail=detail))
    for c in cmp.claims:
        detail = "; ".join(c.notes)
        if c.recorded:
            detail = (f"estimate {_claim_text(c.recorded)} -> {_claim_text(c.new)}"
                      f"{'' if c.estimates_agree else ' (outside the other interval)'}; "
                      f"verdict {c.recorded['verdict']} -> {c.new['verdict']}")
        rows.append(dict(section="claim", item=c.claim_id, status=c.status, n=None, identical=None,
                         within_tolerance=None, different=None, detail=detail))
    return pd.DataFrame(rows, columns=SUMMARY_COLUMNS)


def cells_frame(cmp: Comparison) -> pd.DataFrame:
    rows = [dict(table=t.name, row=d.key, row_status=d.status, column=col, recorded=r, new=v,
                 rule=rule or DIFFERENT)
            for t in cmp.tables for d in t.diffs for col, r, v, rule in (d.cells or [(None, None, None, "")])]
    return pd.DataFrame(rows, columns=CELL_COLUMNS)


def _counts(statuses) -> str:
    statuses = list(statuses)
    order = [IDENTICAL, WITHIN, *FAILING, ONLY_NEW]
    parts = [f"{statuses.count(s)} {s}" for s in order if statuses.count(s)]
    return f"{len(statuses)} ({', '.join(parts)})" if statuses else "none"


def _md_table(header: list[str], rows: list[list]) -> list[str]:
    esc = [[str(c).replace("|", "\\|") for c in row] for row in rows]
    return ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|",
            *("| " + " | ".join(r) + " |" for r in esc), ""]


def markdown(cmp: Comparison, level: int = 3) -> str:
    h = "#" * level
    lines = [f"**{cmp.verdict[0].upper() + cmp.verdict[1:]}.** Recorded run `{cmp.recorded.path}`, new run "
             f"`{cmp.new.path}`: tables {_counts(t.status for t in cmp.tables)}; attack runs "
             f"{_counts(r.status for r in cmp.runs)}; claims {_counts(c.status for c in cmp.claims)}.", "",
             f"Within noise means: {cmp.tolerance.describe()}; claims: each estimate inside the other run's "
             "interval and the same family-wise verdict.", ""]
    if cmp.failures:
        lines += [f"{h} Beyond noise", ""]
        lines += [f"- {section} `{name}`: {status}" + why(cmp, section, name) for section, name, status in
                  cmp.failures] + [""]
    lines += [f"{h} Tables", ""]
    lines += _md_table(["table", "rows", "identical", "within tolerance", "different", "status",
                        "largest move within tolerance (relative)"],
                       [[f"`{t.name}`", t.rows, t.identical, t.within, t.different, t.status, t.largest_move()]
                        for t in cmp.tables])
    if cmp.runs:
        lines += [f"{h} Attack runs", ""]
        lines += _md_table(["run", "images", "flipped (single)", "share", "allowed", "status"],
                           [[f"`{r.run}`", r.n, f"{r.main_flips:g}" if r.flips else "", _f(r.share) if r.flips else "",
                             f"{r.allowed:g}", r.status] for r in cmp.runs])
    if cmp.claims:
        lines += [f"{h} Claims", ""]
        lines += _md_table(["claim", "recorded estimate [CI]", "new estimate [CI]", "recorded verdict", "new verdict",
                            "status"],
                           [[f"`{c.claim_id}`", _claim_text(c.recorded), _claim_text(c.new),
                             c.recorded.get("verdict", ""), c.new.get("verdict", ""), c.status] for c in cmp.claims])
    if cmp.notes:
        lines += [f"{h} Notes", ""] + [f"- {n}" for n in cmp.notes] + [""]
    return "\n".join(lines).rstrip("\n") + "\n"


def why(cmp: Comparison, section: str, name: str) -> str:
    """': <what moved>' for one compared item: the rows, flips or estimates and verdicts."""
    if section == "table":
        t = next(t for t in cmp.tables if t.name == name)
        named = [d.describe() for d in t.diffs if d.status != WITHIN] + t.notes
        return (": " + "; ".join(named[:8]) + (f"; +{len(named) - 8} more" if len(named) > 8 else "")) if named else ""
    if section == "attack run":
        r = next(r for r in cmp.runs if r.run == name)
        return ": " + "; ".join(r.notes + [f"flipped {', '.join(f'{c} {v:g}' for c, v in r.flips.items())} of "
                                           f"{r.n} (allowed {r.allowed:g})"] if r.flips else r.notes)
    c = next(c for c in cmp.claims if c.claim_id == name)
    if not c.recorded:
        return ": " + "; ".join(c.notes)
    return (f": estimate {_claim_text(c.recorded)} -> {_claim_text(c.new)}"
            f"{'' if c.estimates_agree else ' (outside the other interval)'}, verdict {c.recorded['verdict']} -> "
            f"{c.new['verdict']}")


def write_reports(cmp: Comparison, csv_path, md_path, cells_path=None, level: int = 3) -> None:
    """Write ``compare.csv``, ``compare.md`` and (with ``cells_path``) ``compare_cells.csv``."""
    from ..io import write_text

    for p in (csv_path, md_path, cells_path):
        if p is not None:
            Path(p).parent.mkdir(parents=True, exist_ok=True)
    write_text(csv_path, summary_frame(cmp).to_csv(index=False, lineterminator="\n"))
    write_text(md_path, markdown(cmp, level))
    if cells_path is not None:
        write_text(cells_path, cells_frame(cmp).to_csv(index=False, lineterminator="\n"))
