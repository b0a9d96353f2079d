"""Two runs' attack records, image by image: how many outcomes flipped.

An attack run is ``attacks/<defense>/<threat>/<setting>/<attack>/records.parquet`` (one row per
image, written by :mod:`dbprepro.attacks.runner`).  Its outcome columns are ``correct_<evaluation>``
(``single``, ``mean``, ``worst``, ``vote``): 1 when the image is still classified correctly after
the attack under that evaluation (``mean`` is the share of evaluation draws, a number in [0, 1]).
A flip is an image whose outcome differs between the runs (for ``mean``: the sum over images of
the change, in image equivalents).  A run is

``identical``         the records are equal, every column and row;
``within tolerance``  in every outcome column at most max(flip_images, flip_share x n) of the n
                      images flipped (:meth:`Tolerance.allowed_flips`), e.g. 1 of 256;
``different``         more flips, or images only one run attacked.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from .tolerance import DIFFERENT, IDENTICAL, ONLY_NEW, ONLY_RECORDED, WITHIN, Tolerance

RECORDS = "records.parquet"
OUTCOME_PREFIX = "correct_"
#: the outcome the tables' headline robust accuracy reads (evaluation "single")
MAIN_OUTCOME = "correct_single"


@dataclass
class RunComparison:
    run: str
    status: str
    n: int = 0
    flips: dict[str, float] = field(default_factory=dict)  # outcome column -> flipped images
    allowed: float = 0.0
    notes: list[str] = field(default_factory=list)

    @property
    def main_flips(self) -> float:
        if MAIN_OUTCOME in self.flips:
            return self.flips[MAIN_OUTCOME]
        return max(self.flips.values(), default=0.0)

    @property
    def share(self) -> float:
        return self.main_flips / self.n if self.n else float("nan")


def attack_runs(attacks_dir: Path) -> dict[str, Path]:
    """``defense/threat/setting/attack`` -> its merged records, for every run under ``attacks_dir``."""
    if not attacks_dir.is_dir():
        return {}
    return {"/".join(p.relative_to(attacks_dir).parts[:4]): p for p in sorted(attacks_dir.glob(f"*/*/*/*/{RECORDS}"))}


def _image_key(df: pd.DataFrame) -> list[str]:
    return [c for c in ("id", "draw") if c in df.columns]


def compare_records(run: str, recorded: pd.DataFrame, new: pd.DataFrame, tol: Tolerance) -> RunComparison:
    """Flipped outcomes of one attack run (records of the two runs as data frames)."""
    key = _image_key(recorded)
    if not key or key != _image_key(new):
        raise ValueError(f"{run}: records without a common image id column")
    a, b = recorded.set_index(key).sort_index(), new.set_index(key).sort_index()
    res = RunComparison(run, IDENTICAL, n=len(a.index.union(b.index)))
    res.allowed = tol.allowed_flips(res.n)
    only_a, only_b = a.index.difference(b.index), b.index.difference(a.index)
    if len(only_a) or len(only_b):
        for label, idx in (("recorded", only_a), ("new", only_b)):
            if len(idx):
                res.notes.append(f"images only in {label}: {', '.join(map(str, list(idx)[:10]))}"
                                 f"{' ...' if len(idx) > 10 else ''}")
        res.status = DIFFERENT
    common = a.index.intersection(b.index)
    outcomes = [c for c in a.columns if c.startswith(OUTCOME_PREFIX) and c in b.columns]
    if not outcomes:
        raise ValueError(f"{run}: no outcome column ({OUTCOME_PREFIX}*) in both records")
    for col in outcomes:
        x = a.loc[common, col].to_numpy(dtype=np.float64)
        y = b.loc[common, col].to_numpy(dtype=np.float64)
        binary = np.isin(np.concatenate([x, y]), (0.0, 1.0)).all()
        res.flips[col] = float((x != y).sum()) if binary else float(np.abs(x - y).sum())
    if res.status == DIFFERENT:
        return res
    if _frames_equal(a, b):
        return res
    over = {c: f for c, f in res.flips.items() if f > res.allowed + 1e-9}
    res.status = DIFFERENT if over else WITHIN
    moved = [c for c in a.columns if c in b.columns and not a[c].equals(b[c])]
    if moved:
        res.notes.append(f"columns that differ: {', '.join(moved[:8])}{' ...' if len(moved) > 8 else ''}")
    return res


def _frames_equal(a: pd.DataFrame, b: pd.DataFrame) -> bool:
    if list(a.columns) != list(b.columns) or not a.index.equals(b.index):
        return False
    return all(a[c].equals(b[c]) for c in a.columns)


def compare_attack_runs(recorded_dir: Path, new_dir: Path, tol: Tolerance) -> list[RunComparison]:
    """Every attack run of either ``attacks/`` folder (runs only one side has are named)."""
    ra, rb = attack_runs(recorded_dir), attack_runs(new_dir)
    out = []
    for run in sorted(set(ra) | set(rb)):
        if run not in rb:
            out.append(RunComparison(run, ONLY_RECORDED, notes=["the new run has no such attack run"]))
        elif run not in ra:
            out.append(RunComparison(run, ONLY_NEW, notes=["the recorded run has no such attack run"]))
        else:
            out.append(compare_records(run, pd.read_parquet(ra[run]), pd.read_parquet(rb[run]), tol))
    return out
