"""What a claim is (:class:`Claim`) and what it may read (:class:`RunData`).

A claim names the two quantities it compares (``a`` and ``b``, or the two variables of a rank
correlation), the direction the paper states (``direction``: +1 for a > b or a positive
correlation, -1 for a < b or a negative one) and how to compute it from a run's files.
:mod:`.paper1` and :mod:`.paper2` list the claims whose data a run has; a claim whose runs are
missing is not listed (the configuration cannot test it).  :func:`paired_runs` is the comparison of
two attack runs on the images both attacked, which :mod:`.paper1` and :mod:`.adaptive` share.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from . import stats


@dataclass
class RunData:
    """What a claim may read: the merged attack records of every run (one frame, with the
    ``defense``, ``threat``, ``setting``, ``attack`` columns), the clean-evaluation records
    (with a ``defense`` column) and paper 2's per-image tables by name."""

    records: pd.DataFrame
    clean: pd.DataFrame
    p2: dict[str, pd.DataFrame] = field(default_factory=dict)
    evaluation: str = "single"

    def run(self, defense: str, threat: str, setting: str, attack: str = "pgd") -> pd.DataFrame | None:
        r = self.records
        sub = r[(r["defense"] == defense) & (r["threat"] == threat) & (r["setting"] == setting)
                & (r["attack"] == attack)]
        return sub.set_index("id").sort_index() if len(sub) else None

    def has(self, defense: str, threat: str, setting: str, attack: str = "pgd") -> bool:
        r = self.records
        return bool(((r["defense"] == defense) & (r["threat"] == threat) & (r["setting"] == setting)
                     & (r["attack"] == attack)).any())


@dataclass
class Claim:
    """One row of the claims table: ``compute(data, seed)`` gives the comparison's
    :class:`~dbprepro.claims.stats.Result` and the two compared values (means over the units)."""

    claim_id: str
    paper: str
    where: str
    statement: str
    a: str
    b: str
    direction: int
    threat: str
    compute: Callable[["RunData", int], tuple[stats.Result, float, float]]
    note: str = ""


Run = tuple[str, str, str, str]  # (defense, threat, setting, attack), the arguments of RunData.run


def paired_runs(a: Run, b: Run, column: str, *, test: Callable[..., stats.Result] | None = None,
                **kw: Any) -> Callable[[RunData, int], tuple[stats.Result, float, float]]:
    """A claim's ``compute``: ``column`` of run ``a`` against run ``b`` on the images both runs
    attacked.  ``test`` is the paired test; by default exact McNemar (``stats.paired_binary``) for
    0/1 outcomes and the sign-flip test (``stats.paired_values``) for scores (means over draws)."""
    def compute(data: RunData, seed: int):
        ra, rb = data.run(*a), data.run(*b)
        ids = ra.index.intersection(rb.index)
        va, vb = ra.loc[ids, column].to_numpy(float), rb.loc[ids, column].to_numpy(float)
        fn = test
        if fn is None:
            binary = np.isin(va, (0.0, 1.0)).all() and np.isin(vb, (0.0, 1.0)).all()
            fn = stats.paired_binary if binary else stats.paired_values
        return fn(va, vb, seed=seed, **kw), float(va.mean()), float(vb.mean())

    return compute
