"""Threat settings and evaluation protocols: which randomness an attacker sees, and how an
adversarial example is scored.

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
"""

from __future__ import annotations

import re
from typing import Literal

import numpy as np
import torch

from ..purifiers.defended import predict_labels
from ..randomness import Randomness

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


def settings_randomness(setting: str, seed: int, fixed_draw: int = 0) -> Randomness:
    """The purifier randomness an attack setting runs against (``fixed_draw`` is the
    configuration of plain ``dwbox``; ``dwbox_c{k}`` uses configuration ``k``)."""
    k = setting_fixed_draw(setting, fixed_draw)
    if k is not None:
        return Randomness(seed, "fixed", fixed_draw=k)
    return Randomness(seed, "random")


def _check_randomness(setting: str, randomness: Randomness) -> None:
    """Refuse a purifier whose randomness does not fit ``setting`` (mode, and the configuration
    of ``dwbox_c{k}``)."""
    fixed = is_fixed(setting)
    if fixed != (randomness.mode == "fixed"):
        raise ValueError(f"setting {setting!r} needs the purifier's randomness in "
                         f"{'fixed' if fixed else 'random'} mode, it is {randomness.mode!r}")
    k = setting_fixed_draw(setting, randomness.fixed_draw)
    if fixed and k != randomness.fixed_draw:
        raise ValueError(f"setting {setting!r} attacks fixed configuration {k}, the purifier uses "
                         f"configuration {randomness.fixed_draw}")


@torch.no_grad()
def evaluate_draws(model, x: torch.Tensor, ids: torch.Tensor, n: int,
                   setting: Setting, offset: int = EVAL_DRAW_OFFSET) -> np.ndarray:
    """Predicted labels [B, n] of ``x`` under ``n`` evaluation draws (:func:`predict_labels`: for
    a vote defense each evaluation draw is itself a vote over its V purifications).

    ``dwbox`` and ``dwbox_c{k}`` evaluate with the attacker's fixed configuration (one
    deterministic purification, repeated; for ``dwbox_c{k}`` configuration k, which the
    purifier must use); the stochastic settings use fresh draws the attacker never saw.
    """
    ids = torch.as_tensor(ids, dtype=torch.long).cpu()
    k = setting_fixed_draw(setting, model.purifier.randomness.fixed_draw)
    if k is not None:
        _check_randomness(setting, model.purifier.randomness)
        d = torch.full_like(ids, k)
        pred = predict_labels(model, x, ids, d).cpu().numpy()
        return np.repeat(pred[:, None], n, axis=1)
    out = np.zeros((x.shape[0], n), dtype=np.int64)
    for k in range(n):
        d = torch.full_like(ids, offset + k)
        out[:, k] = predict_labels(model, x, ids, d).cpu().numpy()
    return out



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

