"""The ADDT training losses: the DDPM family's (paper 1's ablation variants) and the VP-SDE and EDM
families', and :func:`make_loss_fn`, which picks a purifier family's loss through the purifier
registry (each registered family names its ``loss_family``)."""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from ..purifiers.registry import PURIFIERS
from .adbm import ADBM_DEFAULTS, adbm_loss
from .cgpo import _alpha_terms, cgpo, cgpo_delta, mixing_weight, no_rbgm_ratio, pgd_perturbation

Variant = Literal["addt", "addt_no_rbgm", "cgpo_mse", "clean_finetune", "adbm"]
#: the training methods: ADDT and its ablations, and ADBM's bridge loss (:mod:`dbprepro.addt.adbm`)
VARIANTS: tuple[str, ...] = ("addt", "addt_no_rbgm", "cgpo_mse", "clean_finetune", "adbm")


def addt_loss(unet: nn.Module, scheduler, classifier: nn.Module | None, x0: torch.Tensor, y: torch.Tensor, *,
              variant: Variant, iterations: int = 5, lambda_scale: float = 0.03, lambda_max: float = 0.3,
              pgd_eps: float = 8 / 255, pgd_alpha: float = 4 / 255, t_max: int | None = None,
              generator: torch.Generator | None = None, adbm: dict | None = None) -> torch.Tensor:
    """The training loss of one minibatch for ``variant`` (``x0`` in [-1, 1]); ``adbm`` holds the
    ``adbm`` variant's settings (:data:`~dbprepro.addt.adbm.ADBM_DEFAULTS` where absent)."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown ADDT variant {variant!r}; known: {', '.join(VARIANTS)}")
    if variant == "adbm":
        return adbm_loss(unet, scheduler, classifier, x0, y, generator=generator, **{**ADBM_DEFAULTS, **(adbm or {})})
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
        target = eps + no_rbgm_ratio(sa, s1a) * delta  # the PGD's r_t (clipped at 10)
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



def make_loss_fn(classifier: nn.Module | None, variant: Variant, *, family: str = "ddpm", iterations: int = 5,
                 lambda_scale: float = 0.03, lambda_max: float = 0.3, pgd_eps: float = 8 / 255,
                 pgd_alpha: float = 4 / 255, t_max: int | None = None, beta_min: float = 0.1, beta_max: float = 20.0,
                 p_mean: float = -1.2, p_std: float = 1.2, sigma_data: float = 0.5,
                 timestep_map: str = "interpolate", adbm: dict | None = None):
    """The ``loss_fn(unet, scheduler, x0, y, generator)`` of :func:`dbprepro.models.training.train_ddpm`
    for ``variant`` (the classifier is frozen: eval mode, no gradients into its weights).

    ``family`` is the purifier the model is fine-tuned for (a ``purification.sampler`` name):
    ``ddpm`` / ``ddim`` use :func:`addt_loss` (DDIM shares the DDPM loss), ``vpsde`` / ``edm``
    :func:`addt_loss_family` with ``beta_min``, ``beta_max`` (VP), ``p_mean``, ``p_std``,
    ``sigma_data`` (EDM) and ``timestep_map``.  ``t_max`` caps the training noise levels of every
    family at the DDPM's timestep ``t_max`` (None: the paper's full range); ``pgd_eps``,
    ``pgd_alpha`` only concern ``addt_no_rbgm`` (DDPM family only); ``adbm`` (the ``addt.adbm``
    section: T' range, eps, attack steps) only the ``adbm`` variant (DDPM family only).
    """
    if family not in PURIFIERS:
        raise ValueError(f"unknown ADDT family {family!r}; known (the registered samplers): {', '.join(PURIFIERS)}")
    if variant not in VARIANTS:
        raise ValueError(f"unknown ADDT variant {variant!r}; known: {', '.join(VARIANTS)}")
    loss_family = PURIFIERS[family].loss_family
    if loss_family != "ddpm" and variant not in FAMILY_VARIANTS:
        raise ValueError(f"ADDT variant {variant!r} is not implemented for the {family} family; "
                         f"its variants: {', '.join(FAMILY_VARIANTS)}")
    if classifier is not None:
        classifier.eval().requires_grad_(False)
    if variant in ("addt", "addt_no_rbgm", "adbm") and classifier is None:
        raise ValueError(f"variant {variant!r} needs the classifier")

    if loss_family == "ddpm":
        def loss_fn(unet, scheduler, x0, y, generator):
            return addt_loss(unet, scheduler, classifier, x0, y, variant=variant, iterations=iterations,
                             lambda_scale=lambda_scale, lambda_max=lambda_max, pgd_eps=pgd_eps, pgd_alpha=pgd_alpha,
                             t_max=t_max, generator=generator, adbm=adbm)
    else:
        def loss_fn(unet, scheduler, x0, y, generator):
            return addt_loss_family(unet, scheduler, classifier, x0, y, family=loss_family, variant=variant,
                                    iterations=iterations, lambda_scale=lambda_scale, lambda_max=lambda_max,
                                    beta_min=beta_min, beta_max=beta_max, p_mean=p_mean, p_std=p_std,
                                    sigma_data=sigma_data, timestep_map=timestep_map, t_max=t_max,
                                    generator=generator)

    return loss_fn


def network_passes_per_step(variant: Variant, iterations: int, attack_steps: int = 3) -> int:
    """Forward+backward passes through the UNet per training step: the deterministic cost of a
    variant relative to plain fine-tuning (1 pass); CGPO/PGD adds one per iteration, ADBM's
    perturbation one per ``attack_steps``.  The same for every family: the VP and EDM losses also
    make one UNet call per CGPO iteration plus one."""
    if variant == "adbm":
        return attack_steps + 1
    return 1 if variant == "clean_finetune" else iterations + 1


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
# The network is called at the discrete timestep of the same noise level (dbprepro.purifiers.NoiseLevelMap).
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
    from ..purifiers import NoiseLevelMap

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
