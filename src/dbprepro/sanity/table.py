"""``sanity.csv`` (+ ``.md``): one row per check and compared run of every battery job, from the
battery's per-image records (:mod:`dbprepro.sanity.runner`) and the decisions of
:mod:`dbprepro.sanity.checks`."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from ..metrics import write_table
from .checks import Check, iterations_check, not_stronger_check, sweep_check, unbounded_check
from .plan import randomness_class

COLUMNS = ("defense", "threat", "check", "compared", "setting", "n_images", "value", "reference", "estimate", "ci_low",
           "ci_high", "threshold", "outcome", "detail")


def _paired(rec: pd.DataFrame, run_a: str, run_b: str) -> tuple[np.ndarray, np.ndarray]:
    """Outcomes of two runs on the images both have (sorted by id)."""
    a = rec[rec["run"] == run_a].set_index("id")["correct"]
    b = rec[rec["run"] == run_b].set_index("id")["correct"]
    common = a.index.intersection(b.index).sort_values()
    return a.loc[common].to_numpy(), b.loc[common].to_numpy()


def job_checks(rec: pd.DataFrame, *, max_final_accuracy: float, confidence: float = 0.95, resamples: int = 2000,
               seed: int = 0) -> list[Check]:
    """Every check of one battery job's records (one defense and threat model)."""
    stats = dict(confidence=confidence, resamples=resamples, seed=seed)
    out: list[Check] = []
    sweep = rec[rec["kind"] == "eps_sweep"].sort_values(["eps_factor", "id"])
    factors = sorted(sweep["eps_factor"].unique())
    setting = str(sweep["setting"].iloc[0])
    out.append(sweep_check(factors, [sweep.loc[sweep["eps_factor"] == f, "correct"].to_numpy() for f in factors],
                           max_final_accuracy=max_final_accuracy, setting=setting, **stats))
    it = rec[rec["kind"] == "iterations"]
    run = str(it["run"].iloc[0])
    longer, default = _paired(rec, run, "pgd_eps_x1")
    out.append(iterations_check(default, longer, factor=int(run.rsplit("x", 1)[1]), setting=setting, **stats))
    for kind, label in (("gradient_free", "Square {q} queries"), ("transfer", "transfer from {src}")):
        for run, grp in rec[rec["kind"] == kind].groupby("run", sort=False):
            s = str(grp["setting"].iloc[0])
            ref = f"best_gradient_{randomness_class(s)}"
            a, b = _paired(rec, run, ref)
            name = label.format(q=int(grp["steps"].iloc[0]), src=run.removeprefix("transfer_"))
            out.append(not_stronger_check(kind, f"{name} vs the best gradient attacks", a, b, setting=s, **stats))
    un = rec[rec["run"] == "pgd_unbounded"]
    out.append(unbounded_check(un["correct"].to_numpy(), eps=float(un["eps"].iloc[0]),
                               setting=str(un["setting"].iloc[0])))
    return out


def sanity_table(records: Sequence[pd.DataFrame], *, max_final_accuracy: float, confidence: float = 0.95,
                 resamples: int = 2000, seed: int = 0) -> pd.DataFrame:
    """The sanity table of the battery jobs' records (one DataFrame each)."""
    rows = []
    for rec in records:
        for c in job_checks(rec, max_final_accuracy=max_final_accuracy, confidence=confidence,
                            resamples=resamples, seed=seed):
            rows.append({"defense": rec["defense"].iloc[0], "threat": rec["threat"].iloc[0], **c.row()})
    df = pd.DataFrame(rows, columns=list(COLUMNS))
    df["n_images"] = df["n_images"].astype("Int64")
    return df


def write_sanity_table(record_paths, csv_path, md_path, *, max_final_accuracy: float, confidence: float = 0.95,
                       resamples: int = 2000, seed: int = 0) -> pd.DataFrame:
    """``sanity.csv`` and ``sanity.md`` from the battery's records files."""
    table = sanity_table([pd.read_parquet(p) for p in record_paths], max_final_accuracy=max_final_accuracy,
                         confidence=confidence, resamples=resamples, seed=seed)
    write_table(table, csv_path, md_path)
    return table
