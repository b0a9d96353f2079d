"""The competing defenses beside ADDT (issue 27): how ADDT, ADBM and GDMP compare under the strongest
attacks, and whether GDMP's robustness survives exact gradients.

- **Worst case, paired by image** (``competitor_worst_<a>_vs_<b>``): for each pair of ADDT, ADBM (Li et
  al. 2025) and GDMP (Wang et al. 2022) that the run has, an image counts as robust only if it survives
  every attack run both defenses were attacked with on the threat model (the same runs on both sides: the
  per-image worst case of the robustness waterfall, :mod:`.ensemble`), compared on the images every one
  of those runs attacked - a competing defense's first ``competitors.n_images``, the same images vanilla
  and ADDT were attacked on.  The stated direction, the later defense above the earlier (ADBM > ADDT,
  ADBM > GDMP; GDMP > ADDT as its paper claims robustness without fine-tuning), only labels the verdict:
  ``contradicted`` says the other defense is the more robust one.
- **GDMP under BPDA against exact gradients** (``gdmp_bpda_vs_exact_<setting>``): robust accuracy under
  BPDA (the identity backward pass GDMP's own evaluation relied on) against PGD with the exact gradient
  through the guided chain, same steps, EOT, radius and images, paired by image.  Lee & Kim (2023) report
  that GDMP's robustness collapses under accurate gradients: the claim is BPDA > exact.

Rows appear only when their runs exist (the config lists the defenses in ``competitors.names`` and the
attacks' ``defenses``).
"""

from __future__ import annotations

from typing import Any

from . import stats
from .adaptive import COLUMN, _ensemble_pair, _shared
from .base import Claim, RunData, paired_runs

#: the pairs, stated as (a > b): the later defense above the earlier
PAIRS = (("adbm", "addt"), ("gdmp", "addt"), ("adbm", "gdmp"))
WHERE_WORST = "ADDT, ADBM and GDMP under the worst case (issue 27)"
WHERE_BPDA = "GDMP under exact gradients (issue 27; Lee & Kim 2023)"
NAMES = {"addt": "ADDT", "adbm": "ADBM", "gdmp": "GDMP"}


def competitor_claims(data: RunData, **kw: Any) -> list[Claim]:
    """The competing defenses' rows the run's records can test (module docstring)."""
    claims: list[Claim] = []
    r = data.records
    have = set(r["defense"]) if len(r) else set()
    for tm in dict.fromkeys(r["threat"]) if len(r) else []:
        for a, b in PAIRS:
            if not {a, b} <= have:
                continue
            shared = _shared(data, tm, a, b)
            if not shared:
                continue
            names = ", ".join(f"{atk} {s}" for s, atk in shared)
            claims.append(Claim(
                f"competitor_worst_{a}_vs_{b}_{tm}", NAMES[a], WHERE_WORST,
                f"{NAMES[a]} > {NAMES[b]} against every attack both were run with at once (per-image worst case)",
                f"{a}: robust under all {len(shared)} runs", f"{b}: robust under all {len(shared)} runs", +1, tm,
                _ensemble_pair(tm, a, b, **kw),
                f"paired by image over the runs both have ({names}), one-shot evaluation; the direction only labels "
                "the verdict"))
        for setting in ("whitebox_eot", "whitebox"):
            if data.has("gdmp", tm, setting, "bpda") and data.has("gdmp", tm, setting, "pgd"):
                claims.append(Claim(
                    f"gdmp_bpda_vs_exact_{setting}_{tm}", "Lee & Kim", WHERE_BPDA,
                    f"BPDA overstates GDMP's robustness: robust accuracy under BPDA > under exact-gradient PGD "
                    f"({setting})",
                    f"gdmp: bpda {setting} robust accuracy", f"gdmp: pgd {setting} (exact gradient) robust accuracy",
                    +1, tm, paired_runs(("gdmp", tm, setting, "bpda"), ("gdmp", tm, setting, "pgd"), COLUMN,
                                        test=stats.paired_binary, **kw),
                    "same steps, EOT and images; BPDA's backward pass is the identity through the guided chain"))
    return claims
