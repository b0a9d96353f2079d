"""Threat settings and evaluation protocols: which randomness an attacker sees, and how an
adversarial example is scored.

The settings and evaluation protocols by name (:data:`SETTINGS`, :func:`base_setting`,
:data:`EVALUATIONS`, :func:`summarise_evaluations`, ...) are :mod:`dbprepro.threat_settings` (no torch),
re-exported here; this module adds what needs the network: the purifier randomness of a setting
(:func:`settings_randomness`) and the evaluation draws of a defended classifier (:func:`evaluate_draws`).
"""

from __future__ import annotations

import numpy as np
import torch

from ..purifiers.defended import predict_labels
from ..randomness import Randomness
from ..threat_settings import (EVAL_DRAW_OFFSET, EVALUATIONS, SELECT_DRAW_OFFSET, SETTINGS, Setting,  # noqa: F401
                               base_setting, is_fixed, setting_fixed_draw, summarise_evaluations)


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
