"""Two runs' claims tables (``claims.csv``), claim by claim.

A claim is reproduced within noise when

* the two estimates agree within their intervals: each run's estimate lies inside the other run's
  confidence interval (a shift smaller than either run's own uncertainty; the tables' rounding,
  half a unit of the last written decimal, is allowed).  A claim without an interval in either run
  (an exact rank test over a few units) compares its estimates by the absolute/relative rule;
* its family-wise verdict (``holds`` / ``contradicted`` / ``suggestive`` / ``not significant``,
  :func:`dbprepro.claims.stats.family_verdict`) is the same.

A claims table written before the family-wise verdicts (no ``verdict_raw`` column: its ``verdict``
read the raw p-value) has its family-wise verdict recomputed from its ``p_value``, ``p_holm`` and
``estimate``, with the claim's ``direction`` taken from the other run's table.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from .tolerance import DIFFERENT, IDENTICAL, ONLY_NEW, ONLY_RECORDED, WITHIN, Tolerance

CLAIMS = "claims.csv"
NUMBERS = ("estimate", "ci_low", "ci_high", "p_value", "p_holm")
ROUNDING = 0.5e-4  # claims.csv writes 4 decimals


@dataclass
class ClaimComparison:
    claim_id: str
    status: str
    recorded: dict = field(default_factory=dict)  # estimate, ci_low, ci_high, p_value, p_holm, verdict
    new: dict = field(default_factory=dict)
    estimates_agree: bool | None = None
    verdict_same: bool | None = None
    notes: list[str] = field(default_factory=list)


def family_verdicts(table: pd.DataFrame, directions: dict[str, int], alpha: float) -> pd.Series:
    """The family-wise verdict of every claim: the ``verdict`` column of a table that has
    ``verdict_raw``, else recomputed from p_value, p_holm and estimate with ``directions``."""
    if "verdict_raw" in table.columns:
        return table["verdict"]
    from ..claims.stats import family_verdict

    out = []
    for _, row in table.iterrows():
        d = directions.get(row["claim_id"])
        if d is None or not math.isfinite(d):
            out.append(None)
            continue
        a = float(row["alpha"]) if "alpha" in row and pd.notna(row.get("alpha")) else alpha
        out.append(family_verdict(float(row["estimate"]), float(row["p_value"]), float(row["p_holm"]), int(d), a))
    return pd.Series(out, index=table.index, dtype=object)


def _directions(*tables: pd.DataFrame) -> dict[str, int]:
    for t in tables:  # the new run's first (the caller passes it first)
        if "direction" in t.columns:
            return {c: int(d) for c, d in zip(t["claim_id"], t["direction"]) if pd.notna(d)}
    return {}


def _inside(x: float, lo: float, hi: float) -> bool:
    return lo - ROUNDING <= x <= hi + ROUNDING


def _estimates_agree(r: dict, v: dict, tol: Tolerance) -> bool:
    er, ev = r["estimate"], v["estimate"]
    if _nan(er) and _nan(ev):
        return True
    if _nan(er) or _nan(ev):
        return False
    intervals = [(x["ci_low"], x["ci_high"]) for x in (r, v)]
    if any(_nan(lo) or _nan(hi) for lo, hi in intervals):
        return tol.close(er, ev)
    return _inside(er, *intervals[1]) and _inside(ev, *intervals[0])


def _nan(x) -> bool:
    return x is None or (isinstance(x, float) and math.isnan(x))


def _row(table: pd.DataFrame, verdicts: pd.Series, i) -> dict:
    row = table.loc[i]
    out = {k: (float(row[k]) if k in row and pd.notna(row[k]) else float("nan")) for k in NUMBERS}
    out["verdict"] = verdicts.loc[i]
    return out


def compare_claims(recorded: Path, new: Path, tol: Tolerance) -> tuple[list[ClaimComparison], list[str]]:
    """(per-claim comparisons, notes) of two claims tables."""
    a, b = pd.read_csv(recorded), pd.read_csv(new)
    for name, t in (("recorded", a), ("new", b)):
        if t["claim_id"].duplicated().any():
            raise ValueError(f"{name} claims.csv names a claim twice: {sorted(t.claim_id[t.claim_id.duplicated()])}")
    directions = _directions(b, a)
    notes = []
    old = [name for name, t in (("recorded", a), ("new", b)) if "verdict_raw" not in t.columns]
    if old and directions:
        notes += [f"{name} claims.csv predates the family-wise verdicts (no verdict_raw): its family-wise verdicts "
                  "are recomputed from p_value, p_holm and estimate with the other run's directions" for name in old]
    elif old:
        notes.append("neither claims.csv has family-wise verdicts or directions: their verdicts are compared as "
                     "written")
    recomputed = bool(old and directions)
    va, vb = family_verdicts(a, directions, tol.alpha), family_verdicts(b, directions, tol.alpha)
    if not directions and "verdict_raw" not in a.columns and "verdict_raw" not in b.columns:
        va, vb = a["verdict"], b["verdict"]  # both raw-level tables: their own verdicts, as written
    ia, ib = a.set_index("claim_id", drop=False), b.set_index("claim_id", drop=False)
    va.index, vb.index = ia.index, ib.index
    out = []
    for cid in list(ia.index) + [c for c in ib.index if c not in ia.index]:
        if cid not in ib.index or cid not in ia.index:
            side = ONLY_RECORDED if cid not in ib.index else ONLY_NEW
            out.append(ClaimComparison(cid, side, notes=[f"the {'new' if side == ONLY_RECORDED else 'recorded'} "
                                                         "run has no such claim"]))
            continue
        r, v = _row(ia, va, cid), _row(ib, vb, cid)
        c = ClaimComparison(cid, IDENTICAL, recorded=r, new=v)
        c.estimates_agree = _estimates_agree(r, v, tol)
        c.verdict_same = r["verdict"] is not None and r["verdict"] == v["verdict"]
        same_numbers = all((_nan(r[k]) and _nan(v[k])) or r[k] == v[k] for k in NUMBERS)
        as_written = ia.loc[cid, "verdict"] == ib.loc[cid, "verdict"] and not recomputed
        if not (c.estimates_agree and c.verdict_same):
            c.status = DIFFERENT
        elif not (same_numbers and as_written):  # a recomputed verdict is never bit for bit the recorded one
            c.status = WITHIN
        out.append(c)
    return out, notes
