"""CGPO (classifier-guided perturbation optimisation) and RBGM (rank-based Gaussian mapping), the
two parts of paper 1's ADDT, and the ``addt_no_rbgm`` ablation's PGD perturbation.

As in paper 1's training code, the classifier sees the one-step estimate ``x0_hat / 2 + 0.5``
*unclamped* (:func:`classifier_input`): a clamp to [0, 1] would zero the gradient at every pixel
the estimate puts out of range."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn


def mixing_weight(alphas_cumprod_t: torch.Tensor, scale: float = 0.03, max_weight: float = 0.3) -> torch.Tensor:
    """lambda_t = clip(scale * sqrt(abar_t) / sqrt(1 - abar_t), 0, max_weight) (paper 1's 0.03 and 0.3)."""
    a = alphas_cumprod_t.to(torch.float64)
    return (scale * a.sqrt() / (1 - a).sqrt()).clamp(0, max_weight).to(alphas_cumprod_t.dtype)


def rbgm(grad: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Rank-based Gaussian mapping, per (image, channel) over the H*W pixels.

    Output[j] = z_(rank of grad[j]), with z a fresh standard-normal sample sorted ascending:
    the output's values are exactly the Gaussian draw, its ordering that of ``grad``.  Tied
    gradient values (e.g. a constant or an all-zero channel) are ranked in a random order drawn
    from ``generator`` after z (replayable), not by pixel index, which would turn ties into a
    deterministic raster ramp of Gaussian quantiles.
    """
    B, C = grad.shape[:2]
    flat = grad.reshape(B, C, -1)
    z = torch.randn(flat.shape, generator=generator, dtype=flat.dtype).to(flat.device)
    z_sorted, _ = z.sort(dim=-1)
    # tie-break: visit the pixels in a random order, rank them there with a stable sort, map back
    perm = torch.rand(flat.shape, generator=generator, dtype=torch.float64).argsort(dim=-1).to(flat.device)
    order = flat.gather(-1, perm).sort(dim=-1, stable=True).indices  # k-th smallest, in permuted positions
    out = torch.empty_like(z_sorted).scatter_(-1, perm.gather(-1, order), z_sorted)
    return out.reshape(grad.shape)


def classifier_input(x0_hat: torch.Tensor) -> torch.Tensor:
    """What the frozen classifier sees of a one-step estimate in [-1, 1] units: ``x0_hat / 2 + 0.5``,
    deliberately not clamped to [0, 1] (paper 1 feeds ``norm(x0_hat / 2 + 0.5)``; a clamp would
    zero the gradient of the out-of-range pixels)."""
    return x0_hat / 2 + 0.5


def no_rbgm_ratio(sa: torch.Tensor, s1a: torch.Tensor, max_ratio: float = 10.0) -> torch.Tensor:
    """The ``addt_no_rbgm`` ratio ``r_t = clip(sqrt(abar) / sqrt(1 - abar), 0, max_ratio)``: the noisy
    input is ``sa x0 + s1a (eps + r_t delta)`` and the target ``eps + r_t delta``, in the PGD and in
    the training step alike (the official ``train_ADDT_linf.py``; unclipped, the input would be
    ``sa (x0 + delta) + s1a eps``)."""
    return (sa / s1a).clamp(0, max_ratio)


def _alpha_terms(scheduler, t: torch.Tensor, like: torch.Tensor):
    abar = scheduler.alphas_cumprod.to(like.device)[t].to(like.dtype).view(-1, *([1] * (like.ndim - 1)))
    return abar, abar.sqrt(), (1 - abar).sqrt()


def cgpo_delta(eps_theta, classifier: nn.Module | None, x0: torch.Tensor, y: torch.Tensor, a: torch.Tensor,
               b: torch.Tensor, lam: torch.Tensor, *, iterations: int = 5, objective: Literal["ce", "mse"] = "ce",
               generator: torch.Generator | None = None, return_grad: bool = False):
    """CGPO in the VP coordinates of any family: the RBGM-mapped adversarial noise delta for a batch.

    The noisy input is ``x = a x0 + b (sqrt(1 - lam^2) eps + lam delta)`` and the one-step clean
    estimate ``x0_hat = (x - b eps_theta(x)) / a``, with ``a``, ``b`` (signal and noise scales,
    broadcastable to ``x0``), ``lam`` (one per image) and ``eps_theta(x)`` the noise prediction at
    the batch's noise levels.  ``x0`` in [-1, 1]; the classifier sees ``x0_hat / 2 + 0.5``, not
    clamped (:func:`classifier_input`, as paper 1's code).
    ``objective="mse"`` is the ``cgpo_mse`` ablation: maximise ||eps_theta - eps||^2 instead.
    Model weights are untouched; ``return_grad`` also returns the accumulated gradient G.
    """
    lam = lam.view(-1, *([1] * (x0.ndim - 1)))
    delta = torch.randn(x0.shape, generator=generator, dtype=x0.dtype).to(x0.device)
    G = torch.zeros_like(x0)
    for _ in range(iterations):
        eps = torch.randn(x0.shape, generator=generator, dtype=x0.dtype).to(x0.device)
        d = delta.detach().requires_grad_(True)
        x = a * x0 + b * ((1 - lam**2).sqrt() * eps + lam * d)
        eps_hat = eps_theta(x)
        if objective == "ce":
            x0_hat = (x - b * eps_hat) / a
            loss = F.cross_entropy(classifier(classifier_input(x0_hat)), y, reduction="sum")
        else:
            loss = (eps_hat - eps).square().sum()
        (g,) = torch.autograd.grad(loss, d)
        G = G + g
        delta = rbgm(G, generator)
    return (delta.detach(), G.detach()) if return_grad else delta.detach()


def cgpo(unet: nn.Module, scheduler, classifier: nn.Module, x0: torch.Tensor, y: torch.Tensor, t: torch.Tensor,
         lam: torch.Tensor, *, iterations: int = 5, objective: Literal["ce", "mse"] = "ce",
         generator: torch.Generator | None = None, return_grad: bool = False):
    """CGPO of the DDPM family at integer timesteps ``t``: :func:`cgpo_delta` with
    ``a = sqrt(abar_t)``, ``b = sqrt(1 - abar_t)`` and ``eps_theta(x) = unet(x, t)``."""
    _, sa, s1a = _alpha_terms(scheduler, t, x0)
    return cgpo_delta(lambda x: unet(x, t).sample, classifier, x0, y, sa, s1a, lam, iterations=iterations,
                      objective=objective, generator=generator, return_grad=return_grad)


def pgd_perturbation(unet: nn.Module, scheduler, classifier: nn.Module, x0: torch.Tensor, y: torch.Tensor,
                     t: torch.Tensor, *, iterations: int = 5, eps: float = 8 / 255, alpha: float = 4 / 255,
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """The ``addt_no_rbgm`` perturbation: L-inf PGD on the one-step clean estimate, in [-1, 1] units
    of x0 (``eps``, ``alpha`` in [0, 1] pixel units are doubled).  The noisy input is the training
    step's, ``sa x0 + s1a (noise + r_t delta)`` with the clipped :func:`no_rbgm_ratio`; the
    classifier sees the unclamped :func:`classifier_input`."""
    _, sa, s1a = _alpha_terms(scheduler, t, x0)
    r = no_rbgm_ratio(sa, s1a)
    delta = torch.zeros_like(x0)
    e, a = 2 * eps, 2 * alpha
    for _ in range(iterations):
        noise = torch.randn(x0.shape, generator=generator, dtype=x0.dtype).to(x0.device)
        d = delta.detach().requires_grad_(True)
        x_t = sa * x0 + s1a * (noise + r * d)
        x0_hat = (x_t - s1a * unet(x_t, t).sample) / sa
        loss = F.cross_entropy(classifier(classifier_input(x0_hat)), y, reduction="sum")
        (g,) = torch.autograd.grad(loss, d)
        delta = (delta + a * g.sign()).clamp(-e, e)
        delta = (x0 + delta).clamp(-1, 1) - x0
    return delta.detach()


def rbgm_samples(unet: nn.Module, scheduler, classifier: nn.Module, images01: torch.Tensor, labels: torch.Tensor, *,
                 t: int, iterations: int = 5, lambda_scale: float = 0.03, lambda_max: float = 0.3,
                 seed: int = 0) -> dict:
    """A CGPO perturbation before RBGM (the accumulated gradient G, standardised per image and
    channel for comparison) and after it (delta), on ``images01`` at timestep ``t``."""
    classifier.eval().requires_grad_(False)
    x0 = images01 * 2 - 1
    tt = torch.full((x0.shape[0],), int(t), dtype=torch.long)
    lam = mixing_weight(scheduler.alphas_cumprod[tt], lambda_scale, lambda_max)
    delta, G = cgpo(unet, scheduler, classifier, x0, labels, tt, lam, iterations=iterations,
                    generator=torch.Generator().manual_seed(seed), return_grad=True)
    flat = G.flatten(2)
    g_std = (flat - flat.mean(-1, keepdim=True)) / flat.std(-1, keepdim=True).clamp_min(1e-12)
    return {"gradient": g_std.flatten().numpy(), "delta": delta.flatten().numpy(), "t": int(t),
            "lambda": float(lam[0]), "n_images": int(x0.shape[0])}

