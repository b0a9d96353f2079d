"""What a claim is (:class:`Claim`) and what it may read (:class:`RunData`).

A claim names the two quantities it compares (``a`` and ``b``, or the two variables of a rank
correlation), the direction the paper states (``direction``: +1 for a > b or a positive
correlation, -1 for a < b or a negative one) and how to compute it from a run's files.
:mod:`.paper1` and :mod:`.paper2` list the claims whose data a run has; a claim whose runs are
missing is not listed (the configuration cannot test it).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

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
