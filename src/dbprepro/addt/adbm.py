"""ADBM: the adversarial diffusion bridge loss (Li et al., ICLR 2025, arXiv 2408.00315), the ``adbm``
training variant beside ADDT's.

ADBM fine-tunes the epsilon network so that the reverse process runs from the diffused *adversarial*
image back to the *clean* one.  Per minibatch (DDPM family, integer timesteps of the network):

    T' ~ U{t_prime_min..t_prime_max} (one per batch),  t ~ U{1..T'},  z ~ N(0, I) (per image)
    c_in(t)  = abar_T' (1 - abar_t) / ((1 - abar_T') sqrt(abar_t))
    c_tgt(t) = abar_T' sqrt(1 - abar_t) / ((1 - abar_T') sqrt(abar_t))
    x_t      = sqrt(abar_t) x0 + sqrt(1 - abar_t) z + c_in(t) delta
    L_b      = mean || eps_theta(x_t, t) - (z + c_tgt(t) delta) ||^2

so x_T' is exactly the diffused adversarial image sqrt(abar_T') (x0 + delta) + sqrt(1 - abar_T') z, the
perturbation's weight fades to 0 as t -> 0, and the target's one-step (Tweedie) estimate is the clean x0.
The paper's continuous T' ~ U(0.1, 0.2), t ~ U(0, T') are the timesteps 100..200 of 1000 here.

delta = x_adv - x0 comes from the classifier-guided perturbation of ADBM's ``get_adv_batch``: from a
uniform start in [-eps, eps], ``attack_steps`` sign steps of size eps (iterated FGSM) on the cross-entropy
of the frozen classifier at the one-step estimate x0_hat of the bridge input, projected to the eps ball
and to [-1, 1], with the *same* T', t and z as the loss; the network is in eval mode during the attack.
``eps`` is in [0, 1] pixel units (doubled on the [-1, 1] scale, as the official code's 16/255 = 8/255
pixels).  Without a classifier the attack ascends L_b itself (the official code's fallback).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .cgpo import classifier_input

#: ADBM's defaults scaled to the digits: T' in timesteps 100..200 (the paper's 0.1..0.2), 3 FGSM steps
ADBM_DEFAULTS = {"t_prime_min": 100, "t_prime_max": 200, "eps": 0.2, "attack_steps": 3}


def bridge_coefficients(abar_t: torch.Tensor, abar_tp: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(c_in, c_tgt) of the bridge at noise levels abar_t with the bridge's end abar_T' (broadcasting)."""
    ratio = abar_tp / (1 - abar_tp)
    return ratio * (1 - abar_t) / abar_t.sqrt(), ratio * (1 - abar_t).sqrt() / abar_t.sqrt()


def bridge_pair(x0: torch.Tensor, delta: torch.Tensor, z: torch.Tensor, abar_t: torch.Tensor,
                abar_tp: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The bridge input x_t and target z + c_tgt delta (``abar_t`` broadcastable to ``x0``)."""
    c_in, c_tgt = bridge_coefficients(abar_t, abar_tp)
    return abar_t.sqrt() * x0 + (1 - abar_t).sqrt() * z + c_in * delta, z + c_tgt * delta


def sample_bridge(scheduler, x0: torch.Tensor, *, t_prime_min: int = 100, t_prime_max: int = 200,
                  generator: torch.Generator | None = None) -> tuple[int, torch.Tensor, torch.Tensor]:
    """(T', t, z): T' ~ U{t_prime_min..t_prime_max} for the batch, t ~ U{1..T'} per image, z ~ N(0, I)."""
    T = int(scheduler.config.num_train_timesteps)
    if not 1 <= t_prime_min <= t_prime_max < T:
        raise ValueError(f"ADBM needs 1 <= t_prime_min <= t_prime_max < {T}, got {t_prime_min}, {t_prime_max}")
    tp = int(torch.randint(t_prime_min, t_prime_max + 1, (1,), generator=generator))
    t = torch.randint(1, tp + 1, (x0.shape[0],), generator=generator).to(x0.device)
    z = torch.randn(x0.shape, generator=generator, dtype=x0.dtype).to(x0.device)
    return tp, t, z


def adbm_perturbation(unet: nn.Module, scheduler, classifier: nn.Module | None, x0: torch.Tensor, y: torch.Tensor,
                      tp: int, t: torch.Tensor, z: torch.Tensor, *, eps: float = 0.2, attack_steps: int = 3,
                      generator: torch.Generator | None = None) -> torch.Tensor:
    """ADBM's training perturbation delta = x_adv - x0 (module docstring) for fixed (T', t, z); weights untouched."""
    e = 2 * float(eps)
    view = (-1, *([1] * (x0.ndim - 1)))
    ac = scheduler.alphas_cumprod.to(x0.device)
    abar_t, abar_tp = ac[t].to(x0.dtype).view(view), ac[tp].to(x0.dtype)
    u = torch.rand(x0.shape, generator=generator, dtype=x0.dtype).to(x0.device)
    x_adv = (x0 + (2 * u - 1) * e).clamp(-1, 1)
    if attack_steps == 0 or e == 0:
        return (x_adv - x0).detach()
    training = unet.training
    unet.eval()
    try:
        for _ in range(attack_steps):
            d = (x_adv - x0).detach().requires_grad_(True)
            x_t, target = bridge_pair(x0, d, z, abar_t, abar_tp)
            eps_hat = unet(x_t, t).sample
            if classifier is not None:
                x0_hat = (x_t - (1 - abar_t).sqrt() * eps_hat) / abar_t.sqrt()
                loss = F.cross_entropy(classifier(classifier_input(x0_hat)), y, reduction="sum")
            else:
                loss = (eps_hat - target).square().sum()
            (g,) = torch.autograd.grad(loss, d)
            x_adv = x0 + (d.detach() + e * g.sign()).clamp(-e, e)
            x_adv = x_adv.clamp(-1, 1)
    finally:
        unet.train(training)
    return (x_adv - x0).detach()


def adbm_loss(unet: nn.Module, scheduler, classifier: nn.Module | None, x0: torch.Tensor, y: torch.Tensor, *,
              t_prime_min: int = 100, t_prime_max: int = 200, eps: float = 0.2, attack_steps: int = 3,
              generator: torch.Generator | None = None, return_parts: bool = False):
    """ADBM's bridge loss L_b of one minibatch (``x0`` in [-1, 1]); ``return_parts`` also returns what it
    was computed from (T', t, z, delta, x_t, target)."""
    tp, t, z = sample_bridge(scheduler, x0, t_prime_min=t_prime_min, t_prime_max=t_prime_max, generator=generator)
    delta = adbm_perturbation(unet, scheduler, classifier, x0, y, tp, t, z, eps=eps, attack_steps=attack_steps,
                              generator=generator)
    ac = scheduler.alphas_cumprod.to(x0.device)
    abar_t = ac[t].to(x0.dtype).view(-1, *([1] * (x0.ndim - 1)))
    x_t, target = bridge_pair(x0, delta, z, abar_t, ac[tp].to(x0.dtype))
    loss = F.mse_loss(unet(x_t, t).sample, target)
    if return_parts:
        return loss, dict(t_prime=tp, t=t, z=z, delta=delta, x_t=x_t, target=target)
    return loss
