"""Adversarial Denoising Diffusion Training (ADDT, paper 1 Sec. 5) = CGPO + RBGM.

Paper 1 fine-tunes the diffusion model so that it removes adversarial perturbations itself
instead of relying on randomness.  Each training step:

1. **CGPO** (classifier-guided perturbation optimisation): starting from a Gaussian delta, K
   iterations (default 5) each draw fresh noise eps, form the noisy input with the mixed noise
   ``x_t = sqrt(abar) x0 + sqrt(1 - abar) (sqrt(1 - lambda^2) eps + lambda delta)``, take the
   one-step clean estimate ``x0_hat = (x_t - sqrt(1 - abar) eps_theta(x_t, t)) / sqrt(abar)``,
   add the gradient of the frozen classifier's cross-entropy at x0_hat w.r.t. delta to an
   accumulator G (never reset), and set ``delta = RBGM(G)``.
2. **RBGM** (rank-based Gaussian mapping): per image and channel, a fresh Gaussian sample
   re-ordered by the ranks of G, so delta is exactly Gaussian-distributed with an adversarial
   ordering (every pixel of the mixed noise keeps unit variance).
3. **Training**: ``loss = || eps_theta(x_t, t) - eps_mixed ||^2`` with a fresh eps and the CGPO
   delta, ``lambda_t = clip(0.03 sqrt(abar_t) / sqrt(1 - abar_t), 0, 0.3)``.

Variants (the ablations of paper 1, selected by ``variant``):
``addt``            CGPO + RBGM (the full method);
``addt_no_rbgm``    the L-inf PGD perturbation instead of RBGM (delta from 0, sign steps of
                    ``pgd_alpha`` within ``pgd_eps`` in pixel units; target ``eps + r_t delta``
                    with ``r_t = clip(sqrt(abar) / sqrt(1 - abar), 0, 10)``);
``cgpo_mse``        CGPO's objective replaced by the plain denoising error (no classifier);
``clean_finetune``  the standard DDPM loss with the same schedule (the control).

Everything the papers leave open is a config key (``addt.*`` in the schema).
"""

from __future__ import annotations

import logging
import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)

Variant = Literal["addt", "addt_no_rbgm", "cgpo_mse", "clean_finetune"]
VARIANTS: tuple[str, ...] = ("addt", "addt_no_rbgm", "cgpo_mse", "clean_finetune")


def mixing_weight(alphas_cumprod_t: torch.Tensor, scale: float = 0.03, max_weight: float = 0.3) -> torch.Tensor:
    """lambda_t = clip(scale * sqrt(abar_t) / sqrt(1 - abar_t), 0, max_weight) (paper 1's 0.03 and 0.3)."""
    a = alphas_cumprod_t.to(torch.float64)
    return (scale * a.sqrt() / (1 - a).sqrt()).clamp(0, max_weight).to(alphas_cumprod_t.dtype)


def rbgm(grad: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Rank-based Gaussian mapping, per (image, channel) over the H*W pixels.

    Output[j] = z_(rank of grad[j]), with z a fresh standard-normal sample sorted ascending:
    the output's values are exactly the Gaussian draw, its ordering that of ``grad``.
    """
    B, C = grad.shape[:2]
    flat = grad.reshape(B, C, -1)
    z = torch.randn(flat.shape, generator=generator, dtype=flat.dtype).to(flat.device)
    z_sorted, _ = z.sort(dim=-1)
    ranks = flat.argsort(dim=-1).argsort(dim=-1)  # rank of every pixel's gradient (0 = smallest)
    return z_sorted.gather(-1, ranks).reshape(grad.shape)


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
    the batch's noise levels.  ``x0`` in [-1, 1]; the classifier sees ``x0_hat / 2 + 0.5``.
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
            loss = F.cross_entropy(classifier((x0_hat / 2 + 0.5).clamp(0, 1)), y, reduction="sum")
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
    of x0 (``eps``, ``alpha`` in [0, 1] pixel units are doubled)."""
    _, sa, s1a = _alpha_terms(scheduler, t, x0)
    delta = torch.zeros_like(x0)
    e, a = 2 * eps, 2 * alpha
    for _ in range(iterations):
        noise = torch.randn(x0.shape, generator=generator, dtype=x0.dtype).to(x0.device)
        d = delta.detach().requires_grad_(True)
        x_t = sa * (x0 + d) + s1a * noise
        x0_hat = (x_t - s1a * unet(x_t, t).sample) / sa
        loss = F.cross_entropy(classifier((x0_hat / 2 + 0.5).clamp(0, 1)), y, reduction="sum")
        (g,) = torch.autograd.grad(loss, d)
        delta = (delta + a * g.sign()).clamp(-e, e)
        delta = (x0 + delta).clamp(-1, 1) - x0
    return delta.detach()


def addt_loss(unet: nn.Module, scheduler, classifier: nn.Module | None, x0: torch.Tensor, y: torch.Tensor, *,
              variant: Variant, iterations: int = 5, lambda_scale: float = 0.03, lambda_max: float = 0.3,
              pgd_eps: float = 8 / 255, pgd_alpha: float = 4 / 255, t_max: int | None = None,
              generator: torch.Generator | None = None) -> torch.Tensor:
    """The training loss of one minibatch for ``variant`` (``x0`` in [-1, 1])."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown ADDT variant {variant!r}; known: {', '.join(VARIANTS)}")
    T = int(scheduler.config.num_train_timesteps)
    hi = T if t_max is None else min(T, int(t_max) + 1)
    t = torch.randint(0, hi, (x0.shape[0],), generator=generator).to(x0.device)
    _, sa, s1a = _alpha_terms(scheduler, t, x0)
    if variant == "clean_finetune":
        eps = torch.randn(x0.shape, generator=generator, dtype=x0.dtype).to(x0.device)
        target = eps
        x_t = sa * x0 + s1a * eps
    elif variant == "addt_no_rbgm":
        delta = pgd_perturbation(unet, scheduler, classifier, x0, y, t, iterations=iterations, eps=pgd_eps,
                                 alpha=pgd_alpha, generator=generator)
        eps = torch.randn(x0.shape, generator=generator, dtype=x0.dtype).to(x0.device)
        r = (sa / s1a).clamp(0, 10)
        target = eps + r * delta
        x_t = sa * x0 + s1a * target
    else:
        lam = mixing_weight(scheduler.alphas_cumprod.to(x0.device)[t], lambda_scale, lambda_max).to(x0.dtype)
        delta = cgpo(unet, scheduler, classifier, x0, y, t, lam, iterations=iterations,
                     objective="ce" if variant == "addt" else "mse", generator=generator)
        eps = torch.randn(x0.shape, generator=generator, dtype=x0.dtype).to(x0.device)
        lam = lam.view(-1, *([1] * (x0.ndim - 1)))
        target = (1 - lam**2).sqrt() * eps + lam * delta
        x_t = sa * x0 + s1a * target
    return F.mse_loss(unet(x_t, t).sample, target)


#: purifier sampler names (``purification.sampler``) -> the family of the ADDT loss
LOSS_FAMILIES: dict[str, str] = {"ddpm": "ddpm", "ddim": "ddpm", "vpsde": "vp", "edm": "edm"}


def make_loss_fn(classifier: nn.Module | None, variant: Variant, *, family: str = "ddpm", iterations: int = 5,
                 lambda_scale: float = 0.03, lambda_max: float = 0.3, pgd_eps: float = 8 / 255,
                 pgd_alpha: float = 4 / 255, t_max: int | None = None, beta_min: float = 0.1, beta_max: float = 20.0,
                 p_mean: float = -1.2, p_std: float = 1.2, sigma_data: float = 0.5,
                 timestep_map: str = "interpolate"):
    """The ``loss_fn(unet, scheduler, x0, y, generator)`` of :func:`dbprepro.training.train_ddpm`
    for ``variant`` (the classifier is frozen: eval mode, no gradients into its weights).

    ``family`` is the purifier the model is fine-tuned for (a ``purification.sampler`` name):
    ``ddpm`` / ``ddim`` use :func:`addt_loss` (DDIM shares the DDPM loss), ``vpsde`` / ``edm``
    :func:`addt_loss_family` with ``beta_min``, ``beta_max`` (VP), ``p_mean``, ``p_std``,
    ``sigma_data`` (EDM) and ``timestep_map``.  ``t_max`` caps the training noise levels of every
    family at the DDPM's timestep ``t_max`` (None: the paper's full range); ``pgd_eps``,
    ``pgd_alpha`` only concern ``addt_no_rbgm`` (DDPM family only).
    """
    if family not in LOSS_FAMILIES:
        raise ValueError(f"unknown ADDT family {family!r}; known: {', '.join(LOSS_FAMILIES)}")
    if variant not in VARIANTS:
        raise ValueError(f"unknown ADDT variant {variant!r}; known: {', '.join(VARIANTS)}")
    loss_family = LOSS_FAMILIES[family]
    if loss_family != "ddpm" and variant not in FAMILY_VARIANTS:
        raise ValueError(f"ADDT variant {variant!r} is not implemented for the {family} family; "
                         f"its variants: {', '.join(FAMILY_VARIANTS)}")
    if classifier is not None:
        classifier.eval().requires_grad_(False)
    if variant in ("addt", "addt_no_rbgm") and classifier is None:
        raise ValueError(f"variant {variant!r} needs the classifier")

    if loss_family == "ddpm":
        def loss_fn(unet, scheduler, x0, y, generator):
            return addt_loss(unet, scheduler, classifier, x0, y, variant=variant, iterations=iterations,
                             lambda_scale=lambda_scale, lambda_max=lambda_max, pgd_eps=pgd_eps, pgd_alpha=pgd_alpha,
                             t_max=t_max, generator=generator)
    else:
        def loss_fn(unet, scheduler, x0, y, generator):
            return addt_loss_family(unet, scheduler, classifier, x0, y, family=loss_family, variant=variant,
                                    iterations=iterations, lambda_scale=lambda_scale, lambda_max=lambda_max,
                                    beta_min=beta_min, beta_max=beta_max, p_mean=p_mean, p_std=p_std,
                                    sigma_data=sigma_data, timestep_map=timestep_map, t_max=t_max,
                                    generator=generator)

    return loss_fn


def network_passes_per_step(variant: Variant, iterations: int) -> int:
    """Forward+backward passes through the UNet per training step: the deterministic cost of a
    variant relative to plain fine-tuning (1 pass); CGPO/PGD adds one per iteration.  The same for
    every family: the VP and EDM losses also make one UNet call per CGPO iteration plus one."""
    return 1 if variant == "clean_finetune" else iterations + 1


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


# -- ADDT for the continuous families (paper 1's VP and EDM fine-tuning) -------------------------------
#
# Both write the noisy input in VP coordinates as x = a x0 + b eps_mixed, eps_mixed = sqrt(1 - lambda^2) eps
# + lambda delta, with the one-step estimate x0_hat = (x - b eps_theta) / a:
#   vp:  t ~ U(t_eps, 1) of the continuous VP-SDE, a = alpha(t), b = sigma_vp(t),
#        lambda = clip(0.03 a / b, 0, 0.3), loss ||eps_theta - eps_mixed||^2 (paper 1: "same loss");
#   edm: ln sigma ~ N(P_mean, P_std^2), x_edm = x0 + sigma eps_mixed, a = 1/sqrt(1 + sigma^2), b = sigma a,
#        lambda = clip(0.03 / sigma, 0, 0.3), loss w(sigma) ||D(x_edm; sigma) - x0||^2 with
#        w = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2; since D - x0 = sigma (eps_mixed - eps_theta)
#        for the VP-preconditioned eps network, this is w sigma^2 ||eps_theta - eps_mixed||^2.
# The network is called at the discrete timestep of the same noise level (dbprepro.continuous.NoiseLevelMap).
# CGPO itself is one function for every family (cgpo_delta).  With ``t_max`` (as in the DDPM loss) both
# distributions are cut at the DDPM's noise level of timestep t_max: vp t ~ U(t_eps, t_max / T), edm the
# log-normal truncated to sigma <= sigma(t_max) (exactly, by its inverse CDF; see family_noise_cap).
FAMILY_VARIANTS: tuple[str, ...] = ("addt", "cgpo_mse", "clean_finetune")


def _family_noise_levels(family: str, n: int, generator, *, beta_min: float, beta_max: float, t_eps: float,
                         p_mean: float, p_std: float, t_hi: float = 1.0,
                         sigma_hi: float | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(a, b, sigma_edm) per sample, float64, for the family's training noise distribution.

    vp: t ~ U(t_eps, t_hi) (``t_hi = 1``: the paper's full range); edm: ln sigma ~ N(p_mean, p_std^2),
    truncated to sigma <= ``sigma_hi`` when given, sampled exactly by the inverse CDF
    ``ln sigma = p_mean + p_std ndtri(u Phi(c))``, u ~ U(0, 1], c = (ln sigma_hi - p_mean) / p_std
    (one uniform per sample, no rejection loop).
    """
    if family == "vp":
        if not t_eps < t_hi <= 1:
            raise ValueError(f"the VP training times need t_eps < t_hi <= 1, got t_eps={t_eps}, t_hi={t_hi}")
        t = t_eps + (t_hi - t_eps) * torch.rand(n, generator=generator, dtype=torch.float64)
        log_alpha = -0.25 * t**2 * (beta_max - beta_min) - 0.5 * t * beta_min
        a = log_alpha.exp()
        b = (-torch.expm1(2 * log_alpha)).sqrt()
        return a, b, b / a
    if family == "edm":
        if sigma_hi is None:
            z = torch.randn(n, generator=generator, dtype=torch.float64)
        else:
            c = torch.tensor((math.log(sigma_hi) - p_mean) / p_std, dtype=torch.float64)
            u = 1 - torch.rand(n, generator=generator, dtype=torch.float64)  # (0, 1]: never ndtri(0) = -inf
            z = torch.special.ndtri(u * torch.special.ndtr(c))
        sigma = (p_mean + p_std * z).exp()
        a = 1 / (1 + sigma**2).sqrt()
        return a, sigma * a, sigma
    raise ValueError(f"unknown ADDT family {family!r}; known: vp, edm")


def family_noise_cap(family: str, scheduler, t_max: int | None) -> dict:
    """The ``t_hi`` / ``sigma_hi`` of :func:`_family_noise_levels` for the DDPM cap ``t_max``: the
    noise levels up to the DDPM's timestep ``t_max`` of T (the range the purifier uses, as ``t_max``
    of :func:`addt_loss`).  vp: t_hi = t_max / T; edm: sigma_hi = sqrt((1 - abar) / abar) at
    ``t_max``.  None: no cap."""
    if t_max is None:
        return {}
    T = int(scheduler.config.num_train_timesteps)
    if family == "vp":
        return {"t_hi": min(int(t_max), T) / T}
    abar = float(scheduler.alphas_cumprod[min(int(t_max), T - 1)])
    return {"sigma_hi": math.sqrt((1 - abar) / abar)}


def addt_loss_family(unet: nn.Module, scheduler, classifier: nn.Module | None, x0: torch.Tensor, y: torch.Tensor, *,
                     family: Literal["vp", "edm"], variant: str = "addt", iterations: int = 5,
                     lambda_scale: float = 0.03, lambda_max: float = 0.3, beta_min: float = 0.1,
                     beta_max: float = 20.0, t_eps: float = 1e-5, p_mean: float = -1.2, p_std: float = 1.2,
                     sigma_data: float = 0.5, timestep_map: str = "interpolate", t_max: int | None = None,
                     generator: torch.Generator | None = None, return_parts: bool = False):
    """Paper 1's ADDT loss of one minibatch for the VP (DDPM++) or EDM family (``x0`` in [-1, 1]).

    ``variant``: ``addt`` (CGPO + RBGM), ``cgpo_mse`` (CGPO on the denoising error) or
    ``clean_finetune`` (the family's standard loss).  ``t_max`` caps the noise levels at the DDPM's
    timestep ``t_max`` (:func:`family_noise_cap`; None: the paper's full distribution).
    ``return_parts`` also returns the tensors the loss was computed from (for tests).
    """
    from .purifiers import NoiseLevelMap

    if variant not in FAMILY_VARIANTS:
        raise ValueError(f"ADDT variant {variant!r} is not implemented for the {family} family; "
                         f"known: {', '.join(FAMILY_VARIANTS)}")
    if variant == "addt" and classifier is None:
        raise ValueError("variant 'addt' needs the classifier")
    B = x0.shape[0]
    view = (-1, *([1] * (x0.ndim - 1)))
    a64, b64, sig64 = _family_noise_levels(family, B, generator, beta_min=beta_min, beta_max=beta_max, t_eps=t_eps,
                                           p_mean=p_mean, p_std=p_std, **family_noise_cap(family, scheduler, t_max))
    tmap = NoiseLevelMap(scheduler.alphas_cumprod, timestep_map)
    t_net = torch.tensor([tmap(float(s)) for s in sig64], dtype=torch.float32, device=x0.device)
    if timestep_map == "round":
        t_net = t_net.long()
    a, b = a64.to(x0).view(view), b64.to(x0).view(view)
    lam = (lambda_scale * a64 / b64).clamp(0, lambda_max).to(x0).view(view)

    def eps_theta(x):
        return unet(x, t_net).sample

    if variant == "clean_finetune":
        delta = torch.zeros_like(x0)
        lam = torch.zeros_like(lam)
    else:
        delta = cgpo_delta(eps_theta, classifier, x0, y, a, b, lam, iterations=iterations,
                           objective="ce" if variant == "addt" else "mse", generator=generator)
    eps = torch.randn(x0.shape, generator=generator, dtype=x0.dtype).to(x0.device)
    target = (1 - lam**2).sqrt() * eps + lam * delta
    x = a * x0 + b * target
    err = (eps_theta(x) - target).square()
    if family == "vp":
        loss = err.mean()
    else:
        s = sig64.to(x0).view(view)
        loss = ((s**2 + sigma_data**2) / sigma_data**2 * err).mean()
    if return_parts:
        return loss, dict(a=a, b=b, sigma=sig64, lam=lam, delta=delta, eps=eps, target=target, x=x, t_net=t_net)
    return loss
