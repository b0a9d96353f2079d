"""The gradient modes of the purifiers compared on one input (``results/tables/gradient_modes.csv``).

Every purifier family offers several ways to differentiate through its reverse chain
(``grad_mode``, see :mod:`dbprepro.purifiers.base`): ``exact``
(per-step recomputation), ``autograd``, ``checkpoint``, ``budget`` (between the first two, given an
``activation_budget_mb``; not compared by default) and, for the VP-SDE without corrector,
torchsde's ``adjoint``.  The first four compute the same gradient; the adjoint re-solves the state
backwards and is only first-order accurate.  :func:`mode_gradients` evaluates a loss's input
gradient under several modes on the same noise draw (the one place that does it; also used by
:func:`dbprepro.purifiers.vpsde.adjoint_agreement`), :func:`gradient_agreement` compares two gradients
and :func:`compare_gradient_modes` produces the table rows: time and agreement with ``exact``.
"""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Callable, Sequence

import pandas as pd
import torch
import torch.nn.functional as F

from .base import GRAD_MODES, default_ids
from .defended import DefendedClassifier

log = logging.getLogger(__name__)

#: the modes compared by default (bpda is not a gradient of the chain)
COMPARED_MODES: tuple[str, ...] = ("exact", "autograd", "checkpoint", "adjoint")


def supported_grad_modes(purifier, modes: Sequence[str] = COMPARED_MODES) -> list[str]:
    """The ``modes`` the purifier accepts, in order: those of its ``grad_modes`` (``GRAD_MODES`` for
    the DDPM/DDIM :class:`~dbprepro.purifiers.Purifier`) that its ``grad_mode`` setter does not
    refuse (e.g. ``adjoint`` of a VP-SDE with the Langevin corrector)."""
    saved, out = purifier.grad_mode, []
    try:
        for m in modes:
            if m not in getattr(purifier, "grad_modes", GRAD_MODES):
                continue
            try:
                purifier.grad_mode = m
            except ValueError:
                continue
            out.append(m)
    finally:
        purifier.grad_mode = saved
    return out


def mode_gradients(purifier, x: torch.Tensor, loss_fn: Callable[[torch.Tensor], torch.Tensor],
                   modes: Sequence[str], ids: torch.Tensor | None = None, draws: torch.Tensor | None = None,
                   repeats: int = 1) -> dict[str, dict]:
    """The gradient of ``loss_fn(purifier(x, ids, draws))`` w.r.t. ``x`` under each of ``modes``.

    One noise draw for all modes (``draws``, default the purifier's next draw), so the modes
    differentiate the same function.  Each mode is run ``repeats`` times (forward + backward timed
    with ``time.perf_counter``, CUDA synchronised); returns per mode ``grad`` and ``out`` (the
    purified images) of the first run and ``seconds``, the median time.  The purifier's
    ``grad_mode`` is restored afterwards."""
    if int(repeats) < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    ids = default_ids(x, ids)
    if draws is None:
        draws = purifier.randomness.next_draws(ids)
    sync = torch.cuda.synchronize if x.device.type == "cuda" else (lambda: None)
    saved, res = purifier.grad_mode, {}
    try:
        for mode in modes:
            purifier.grad_mode = mode
            times = []
            for r in range(int(repeats)):
                xx = x.detach().clone().requires_grad_(True)
                sync()
                t0 = time.perf_counter()
                out = purifier(xx, ids=ids, draws=draws)
                (g,) = torch.autograd.grad(loss_fn(out), xx)
                sync()
                times.append(time.perf_counter() - t0)
                if r == 0:
                    res[mode] = {"grad": g.detach(), "out": out.detach()}
            res[mode]["seconds"] = statistics.median(times)
    finally:
        purifier.grad_mode = saved
    return res


def gradient_agreement(g: torch.Tensor, ref: torch.Tensor) -> dict:
    """How close ``g`` is to the reference gradient ``ref``: relative L2 error, cosine, norm ratio
    and largest absolute difference (float64 reductions)."""
    g, ref = g.detach().flatten().double(), ref.detach().flatten().double()
    return {"rel_error": float((g - ref).norm() / ref.norm()),
            "cosine": float(F.cosine_similarity(g, ref, dim=0)),
            "norm_ratio": float(g.norm() / ref.norm()),
            "max_abs_diff": float((g - ref).abs().max())}


def compare_gradient_modes(defended: DefendedClassifier, x: torch.Tensor, y: torch.Tensor,
                           ids: torch.Tensor | None = None, modes: Sequence[str] = COMPARED_MODES, *,
                           repeats: int = 3, draws: torch.Tensor | None = None) -> pd.DataFrame:
    """Input gradient of the defended classifier's cross-entropy (summed over the batch),
    ``CE(classifier(purifier(x)), y)``, under each gradient mode the purifier supports, on one
    noise draw: one row per mode with ``family`` (the purifier's sampler), ``grad_mode``, ``steps``
    (UNet calls of one purification), ``n_images``, ``seconds`` (median of ``repeats`` forward +
    backward passes), and ``rel_error_vs_exact``, ``cosine_vs_exact``, ``max_abs_diff_vs_exact``
    against the ``exact`` mode (always computed, first, as the reference).  Modes the purifier
    does not support are skipped (logged), never approximated by another mode."""
    purifier, classifier = defended.purifier, defended.classifier
    wanted = ["exact", *[m for m in modes if m != "exact"]]
    run = supported_grad_modes(purifier, wanted)
    for m in wanted:
        if m not in run:
            log.info("%s purifier: grad_mode %s not supported, skipped", purifier.sampler, m)
    res = mode_gradients(purifier, x, lambda out: F.cross_entropy(classifier(out), y, reduction="sum"), run,
                         ids=ids, draws=draws, repeats=repeats)
    ref = res["exact"]["grad"]
    rows = []
    for m in run:
        agree = gradient_agreement(res[m]["grad"], ref)
        rows.append({"family": purifier.sampler, "grad_mode": m, "steps": purifier.num_network_calls,
                     "n_images": int(x.shape[0]), "seconds": res[m]["seconds"],
                     "rel_error_vs_exact": agree["rel_error"], "cosine_vs_exact": agree["cosine"],
                     "max_abs_diff_vs_exact": agree["max_abs_diff"]})
    return pd.DataFrame(rows)
