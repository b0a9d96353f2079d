"""Does ADDT's gain survive the strongest attacks?  Claims over the adaptive attacks (issue 17).

For every attack run that vanilla and ADDT share beyond paper 1's PGD (DiffAttack, the surrogate
process, DiffHammer, the low-frequency attack, AutoAttack, BPDA), a row "ADDT > vanilla under that
attack" on the images both runs attacked; and rows for the *ensemble*: an image counts as robust only
if it survives every run both defenses share on the threat model (each run's one-shot evaluation; the
same attacks on both sides, so neither faces more), the per-image worst case over the attacks
(:mod:`.ensemble`, shared with the robustness waterfall), compared on the images every one of those
runs attacked.  The ensemble is formed three times: over every shared run,
over the fixed-randomness runs (settings ``dwbox*``: does ADDT's DW-box gain survive the strongest
attack on the deterministic purifier?) and over the stochastic ones (the others: does its EOT gain
survive the strongest attack on the stochastic purifier?); a split ensemble needs two runs or more
(one run is its own row already).  The rows only appear when the runs exist.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from . import stats
from .base import Claim, RunData, paired_runs
from .ensemble import shared_ids, survives_all

COLUMN = "correct_single"


def _runs(data: RunData, defense: str, threat: str) -> list[tuple[str, str]]:
    r = data.records
    sub = r[(r["defense"] == defense) & (r["threat"] == threat)]
    return list(dict.fromkeys(zip(sub["setting"], sub["attack"])))


def _shared(data: RunData, threat: str, a: str, b: str) -> list[tuple[str, str]]:
    """The (setting, attack) runs both defenses have on ``threat``."""
    theirs = set(_runs(data, b, threat))
    return [run for run in _runs(data, a, threat) if run in theirs]


def _ensemble(data: RunData, defense: str, threat: str, runs, ids: pd.Index) -> np.ndarray:
    """Per image of ``ids``: 1 if it survives every run of ``runs`` of ``defense`` on ``threat``."""
    return survives_all((data.run(defense, threat, setting, attack) for setting, attack in runs), COLUMN, ids)


def _common_ids(data: RunData, threat: str, defenses: tuple[str, ...], runs) -> pd.Index:
    return shared_ids(data.run(d, threat, setting, attack) for d in defenses for setting, attack in runs)


#: the ensembles: suffix of the claim id -> (what the runs are, which shared (setting, attack) runs)
GROUPS = {
    "": ("every shared attack", lambda runs: runs),
    "dwbox_": ("every shared fixed-randomness (DW-box) attack",
               lambda runs: [r for r in runs if r[0].startswith("dwbox")]),
    "stochastic_": ("every shared attack on the stochastic purifier",
                    lambda runs: [r for r in runs if not r[0].startswith("dwbox")]),
}


def _ensemble_pair(threat: str, a: str, b: str, pick=lambda runs: runs, **kw: Any):
    def compute(data: RunData, seed: int):
        runs = pick(_shared(data, threat, a, b))
        ids = _common_ids(data, threat, (a, b), runs)
        va, vb = _ensemble(data, a, threat, runs, ids), _ensemble(data, b, threat, runs, ids)
        return stats.paired_binary(va, vb, seed=seed, **kw), float(va.mean()), float(vb.mean())

    return compute


def adaptive_claims(data: RunData, a: str = "addt", b: str = "vanilla", **kw: Any) -> list[Claim]:
    """ADDT (``a``) > vanilla (``b``) under each non-PGD attack both were run with, and under the
    per-image ensemble of all their runs, per threat model."""
    claims: list[Claim] = []
    for tm in dict.fromkeys(data.records["threat"]) if len(data.records) else []:
        shared = _shared(data, tm, a, b)
        for setting, attack in shared:
            if attack == "pgd":
                continue  # paper 1's own rows (paper1.py)
            claims.append(Claim(
                f"p1_addt_gain_{attack}_{setting}_{tm}", "P1", "ADDT under adaptive attacks (issue 17)",
                f"ADDT > vanilla under {attack} ({setting})",
                f"{a}: {attack} {setting} robust accuracy", f"{b}: {attack} {setting} robust accuracy", +1, tm,
                paired_runs((a, tm, setting, attack), (b, tm, setting, attack), COLUMN,
                            test=stats.paired_binary, **kw)))
        for suffix, (what, pick) in GROUPS.items():
            group = pick(shared)
            if len(group) < 2 or (suffix and len(group) == len(shared)):
                continue  # one run is its own row; a split that is every run repeats the full ensemble
            names = ", ".join(f"{atk} {s}" for s, atk in group)
            claims.append(Claim(
                f"p1_addt_gain_ensemble_{suffix}{tm}", "P1", "ADDT under the strongest known attack (issue 17)",
                f"ADDT > vanilla against {what} at once: an image is robust only if it survives all of them",
                f"{a}: robust under all {len(group)} runs", f"{b}: robust under all {len(group)} runs",
                +1, tm, _ensemble_pair(tm, a, b, pick, **kw),
                f"per-image worst case over the runs both defenses have ({names}), one-shot evaluation"))
    return claims
