"""Threat settings and evaluation protocols by name: which randomness an attacker sees, and how an
adversarial example is scored (pure functions of names and arrays; no torch, so the tables, claims and
merges that read attack records import no network code: tests/test_light_stages.py).

Settings (paper 1, Sec. 3; the names are the paper's)
----------------------------------------------------
``whitebox``
    the attacker differentiates through the stochastic purifier with one fresh randomness
    draw per attack step (no EOT); evaluation uses fresh draws.
``whitebox_eot``
    K fresh draws per step, gradients summed before the sign (EOT); evaluation uses fresh draws.
``dwbox``
    deterministic white-box: the randomness is fixed per sample (a fixed configuration known to
    the attacker), the purifier is a deterministic function P_xi, and the adversarial example
    is evaluated with the same xi.  Plain ``dwbox`` uses the configuration ``attacks.fixed_draw``;
``dwbox_c{k}``
    ``dwbox`` against fixed randomness configuration ``k`` (paper 2's robustness "under fixed
    randomness", averaged over several configurations k = 0, 1, ...).  Everything that holds
    for ``dwbox`` holds for it (:func:`base_setting` maps it to ``dwbox``); only the
    configuration differs (:func:`setting_fixed_draw`).

Every draw the attacker uses is an explicit index of the purifier's replayable
:class:`~dbprepro.randomness.Randomness`: step s, EOT sample k, restart r of a random-mode attack
uses draw ``(r * steps + s) * K + k``; evaluation draws start at :data:`EVAL_DRAW_OFFSET`, so the
attacker never sees the noise it is evaluated with (except in ``dwbox``, by definition).

Evaluation protocols (:data:`EVALUATIONS`): every adversarial example is re-purified ``eval_draws``
times and scored ``single`` / ``mean`` / ``worst`` / ``vote`` (:func:`summarise_evaluations`).

The attacks' side of the settings (the purifier randomness of a setting, the evaluation draws of a
defended classifier) is :mod:`dbprepro.attacks.protocols`, which re-exports every name of this module.
"""

from __future__ import annotations

import re
from typing import Literal

import numpy as np

Setting = Literal["whitebox", "whitebox_eot", "dwbox"]
SETTINGS: tuple[str, ...] = ("whitebox", "whitebox_eot", "dwbox")
EVAL_DRAW_OFFSET = 1 << 40  # evaluation draws never overlap the attacker's draws
SELECT_DRAW_OFFSET = 1 << 41  # draws of AutoAttack's candidate selection (multi-evaluation)
EVALUATIONS = {
    "single": "one fresh purification (one-shot)",
    "mean": "mean over eval_draws purifications (Fixed-AutoAttack score)",
    "worst": "correct under all eval_draws purifications (worst of N)",
    "vote": "majority vote of eval_draws purifications",
}

_DWBOX_CONFIG = re.compile(r"dwbox_c(0|[1-9][0-9]*)")


def base_setting(setting: str) -> Setting:
    """The threat setting of a setting name: ``dwbox_c{k}`` -> ``dwbox``; known names unchanged."""
    if setting in SETTINGS:
        return setting  # type: ignore[return-value]
    if _DWBOX_CONFIG.fullmatch(str(setting)):
        return "dwbox"
    raise ValueError(f"unknown setting {setting!r}; known: {', '.join(SETTINGS)}, dwbox_c<k> (k = 0, 1, ...)")


def is_fixed(setting: str) -> bool:
    """True for the deterministic settings (``dwbox`` and ``dwbox_c{k}``)."""
    return base_setting(setting) == "dwbox"


def setting_fixed_draw(setting: str, default: int = 0) -> int | None:
    """The fixed randomness configuration of a setting: ``k`` for ``dwbox_c{k}``, ``default`` for
    ``dwbox``, None for the stochastic settings."""
    if not is_fixed(setting):
        return None
    m = _DWBOX_CONFIG.fullmatch(setting)
    return int(m.group(1)) if m else int(default)


def summarise_evaluations(preds: np.ndarray, labels: np.ndarray) -> dict[str, np.ndarray]:
    """Per-sample correctness under the evaluation protocols of the literature.

    ``single``: the first evaluation draw (one-shot evaluation, what most papers report);
    ``mean``: fraction of draws classified correctly (paper 1's Fixed-AutoAttack score);
    ``worst``: correct under every draw (DiffHammer's N-evaluation / resubmission risk);
    ``vote``: the majority (most frequent, ties to the lowest label) prediction is correct.
    """
    labels = np.asarray(labels).reshape(-1, 1)
    correct = preds == labels
    n_classes = int(max(preds.max(), labels.max())) + 1
    counts = np.stack([(preds == c).sum(1) for c in range(n_classes)], axis=1)
    vote = counts.argmax(1)
    return {
        "single": correct[:, 0].astype(np.float64),
        "mean": correct.mean(1),
        "worst": correct.all(1).astype(np.float64),
        "vote": (vote == labels[:, 0]).astype(np.float64),
    }

