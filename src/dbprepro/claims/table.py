"""``results/tables/claims.csv``: one row per claim of either paper that a run can test, with
the estimate, its interval, the test, its p-value and a verdict at level ``alpha``.

The family is the whole table: every row's p-value is adjusted by Holm's step-down method over
all rows (``p_holm``), and ``verdict`` (:func:`dbprepro.claims.stats.family_verdict`) is

- ``holds`` / ``contradicted``: ``p_holm`` < ``alpha`` with the estimate in the claimed
  direction (``direction``: +1 a > b or rho > 0, -1 a < b or rho < 0) / against it;
- ``suggestive``: the row's own p < ``alpha`` but not Holm's;
- ``not significant``: otherwise, where ``mde`` is the smallest effect its test would have
  detected with probability ``power`` (:mod:`dbprepro.claims.stats`), in the estimate's units.

``verdict_raw`` is the unadjusted verdict of the row's own test (``holds``, ``contradicted`` or
``not significant`` at p < ``alpha``), for comparison with a paper that tests one claim at a time.
"""

from __future__ import annotations

import logging
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..metrics import write_table
from . import stats
from .adaptive import adaptive_claims
from .base import Claim, RunData
from .competitors import competitor_claims
from .paper1 import paper1_claims
from .paper2 import paper2_claims

log = logging.getLogger("dbprepro.claims")

COLUMNS = ("claim_id", "paper", "where", "claim", "threat", "a", "b", "value_a", "value_b", "estimate", "ci_low",
           "ci_high", "unit", "test", "statistic", "p_value", "p_holm", "n", "mde", "alpha", "direction", "verdict",
           "verdict_raw", "note")


def _unit(result: stats.Result) -> str:
    return "rho" if "Spearman" in result.test else "difference a - b"


def claims_table(claims: list[Claim], data: RunData, *, alpha: float = stats.ALPHA, seed: int = 0) -> pd.DataFrame:
    """Evaluate every claim on ``data``.  Each claim's resampling seed is derived from ``seed`` and
    its id, so a row does not change when other rows are added or removed."""
    rows = []
    for c in claims:
        claim_seed = int(seed) * 1_000_003 + zlib.crc32(c.claim_id.encode())
        res, va, vb = c.compute(data, claim_seed)
        rows.append(dict(claim_id=c.claim_id, paper=c.paper, where=c.where, claim=c.statement, threat=c.threat,
                         a=c.a, b=c.b, value_a=va, value_b=vb, estimate=res.estimate, ci_low=res.ci_low,
                         ci_high=res.ci_high, unit=_unit(res), test=res.test, statistic=res.statistic,
                         p_value=res.p_value, n=res.n, mde=res.mde, alpha=alpha, direction=c.direction,
                         verdict_raw=stats.verdict(res, c.direction, alpha), note=c.note))
    table = pd.DataFrame(rows, columns=[c for c in COLUMNS if c not in ("p_holm", "verdict")])
    return apply_family(table, alpha)


def apply_family(table: pd.DataFrame, alpha: float = stats.ALPHA) -> pd.DataFrame:
    """Holm's ``p_holm`` over every row of ``table`` and each row's family-wise ``verdict``;
    ``mde`` is kept only where the verdict is ``not significant``."""
    table = table.drop(columns=[c for c in ("p_holm", "verdict") if c in table.columns])
    table.insert(table.columns.get_loc("p_value") + 1, "p_holm", stats.holm(table["p_value"].to_numpy(float)))
    verdicts = [stats.family_verdict(e, p, ph, int(d), alpha) for e, p, ph, d in
                zip(table["estimate"], table["p_value"], table["p_holm"], table["direction"], strict=True)]
    table.insert(table.columns.get_loc("direction") + 1, "verdict", verdicts)
    table["mde"] = table["mde"].where(table["verdict"] == "not significant", float("nan"))
    for r in table.itertuples():
        log.info("%-40s %-15s estimate %+.4f, p = %.4g, Holm p = %.4g", r.claim_id, r.verdict, r.estimate,
                 r.p_value, r.p_holm)
    return table


def _formatted(table: pd.DataFrame) -> pd.DataFrame:
    """p-values to 3 significant digits (the tables' 4 decimals would print a p of 3e-06 as 0)."""
    out = table.copy()
    for col in ("p_value", "p_holm"):
        out[col] = out[col].map(lambda p: "" if not np.isfinite(p) else f"{p:.3g}")
    return out


def load_run_data(records: list[str | Path], clean: list[str | Path], p2_tables: dict[str, str | Path],
                  evaluation: str = "single") -> RunData:
    """The run's files as :class:`RunData` (attack records, clean records, paper 2's tables)."""
    frames = [pd.read_parquet(p) for p in dict.fromkeys(map(str, records))]
    rec = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(
        columns=["defense", "threat", "setting", "attack", "id"])
    cl = pd.concat([pd.read_parquet(p).assign(defense=Path(p).parent.name) for p in clean], ignore_index=True) \
        if clean else pd.DataFrame(columns=["defense", "setting", "id", "correct"])
    p2 = {name: pd.read_csv(path) for name, path in p2_tables.items()}
    return RunData(rec, cl, p2, evaluation)


def write_claims_table(records, clean, p2_tables: dict[str, Any], csv_path, md_path, *,
                       defenses: dict[str, dict[str, Any]], threat: str, fixed_settings: list[str],
                       n_images: int | None, evaluation: str = "single", alpha: float = stats.ALPHA,
                       power: float = stats.POWER, confidence: float = 0.95, resamples: int = 2000,
                       seed: int = 0) -> pd.DataFrame:
    """The stage: every testable claim of both papers on the run's files, as CSV and Markdown."""
    data = load_run_data(records, clean, p2_tables, evaluation)
    kw = dict(alpha=alpha, power=power, confidence=confidence, resamples=resamples)
    claims = paper1_claims(data, defenses, **kw) + paper2_claims(
        data, threat=threat, fixed_settings=fixed_settings, n_images=n_images, **kw)
    if "addt" in defenses and "vanilla" in defenses:
        claims += adaptive_claims(data, **kw)
    claims += competitor_claims(data, **kw)  # ADBM, GDMP (competitors.names): only the rows their runs allow
    if not claims:
        raise ValueError("no claim of either paper can be tested on this run's files")
    table = claims_table(claims, data, alpha=alpha, seed=seed)
    write_table(_formatted(table), csv_path, md_path)
    counts = table["verdict"].value_counts().to_dict()
    log.info("%d claims: %s", len(table), ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    return table


def verdict_counts(table: pd.DataFrame, column: str = "verdict") -> dict[str, int]:
    """How many rows have each verdict level (:data:`dbprepro.claims.stats.VERDICTS`) in ``column``."""
    return {k: int(np.sum(table[column] == k)) for k in stats.VERDICTS}
