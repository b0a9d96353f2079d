"""EDM purification (paper 1's EDM family): Heun with stochastic churn on the shared network.

EDM (``EDMPurifier``; paper 1's EDM family)
------------------------------------------
``x_edm = (2 x - 1) + sigma_max eps`` (eps = (FORWARD, t_start)), then EDM's Algorithm 2 (Heun with
stochastic churn) on ``sigma_i = (sigma_max^(1/rho) + i/(N-1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho``,
i < N, sigma_N = 0; churn gamma_i = min(S_churn / N, sqrt(2) - 1) where S_min <= sigma_i <= S_max, else
0; churn noise (CHURN, i) scaled by S_noise; no second-order correction on the last step.  Paper 1
(code): sigma_max 0.5, N = 50, rho 7, sigma_min 0.002, S_churn 6, S_min 0.01, S_max 0.46,
S_noise 1.007.  ``sigma_max=None`` derives it from t* (the DDPM's noise level at t_start: 0.34 at
t* = 0.1 with the 1e-4..0.02 betas; paper 1's 0.5 is more noise than its DDPM t* = 0.1).
diffusers' ``HeunDiscreteScheduler`` has no churn and ``EulerDiscreteScheduler`` / ``EDMEulerScheduler``
are first order; all are stateful (a step counter), which the per-step backward recomputation cannot
use; so the ~15 lines of Algorithm 2 are written out here.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ..randomness import Randomness, Stream
from .continuous import ContinuousPurifier, TimestepMap, edm_sigma
from .registry import register_purifier


@register_purifier
class EDMPurifier(ContinuousPurifier):
    """EDM purification: Heun sampler with stochastic churn (see the module docstring).

    Args:
        unet, scheduler: the epsilon-prediction network (a diffusers ``UNet2DModel`` with the VP
            preconditioning, or the family's own :class:`~dbprepro.models.networks.EpsNetwork`, e.g.
            EDM's SongUNet) and the discrete DDPM scheduler.
        t_star: diffusion strength; keys the forward noise and, with ``sigma_max=None``, sets the
            starting noise level to the DDPM's at t_start.
        sigma_max: starting noise level (paper 1: 0.5) or None (derived from t*).
        steps: N, the Heun steps (paper 1: 50); N - 1 of them take the second-order correction.
        sigma_min, rho: the EDM grid (0.002, 7).
        s_churn, s_min, s_max, s_noise: stochastic churn (paper 1: 6, 0.01, 0.46, 1.007).
    """

    sampler = "edm"
    loss_family = "edm"
    config_section = "edm"

    @classmethod
    def network_calls(cls, purification: dict[str, Any], num_train_timesteps: int = 1000) -> int:
        return 2 * int(purification["edm"]["steps"]) - 1

    @classmethod
    def check_config(cls, cfg: dict[str, Any]) -> None:
        edm = cfg["purification"]["edm"]
        if edm["sigma_max"] is not None and edm["sigma_max"] <= edm["sigma_min"]:
            raise ValueError("config key purification.edm.sigma_max: must be larger than sigma_min")

    def __init__(self, unet: nn.Module, scheduler, t_star: float = 0.1, sigma_max: float | None = 0.5,
                 steps: int = 50, sigma_min: float = 0.002, rho: float = 7.0, s_churn: float = 6.0,
                 s_min: float = 0.01, s_max: float = 0.46, s_noise: float = 1.007,
                 timestep_map: TimestepMap = "interpolate", randomness: Randomness | None = None,
                 grad_mode: str = "exact", clip_output: bool = True):
        super().__init__(unet, scheduler, t_star, timestep_map, randomness, grad_mode, clip_output)
        if sigma_max is None:
            sigma_max = edm_sigma(float(self.alphas_cumprod[self.t_start]))
        if int(steps) < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        if not 0 < sigma_min < sigma_max:
            raise ValueError(f"need 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}")
        if rho <= 0 or s_churn < 0 or s_noise < 0:
            raise ValueError("need rho > 0, s_churn >= 0 and s_noise >= 0")
        self.sigma_max, self.sigma_min, self.rho = float(sigma_max), float(sigma_min), float(rho)
        self.s_churn, self.s_min, self.s_max, self.s_noise = float(s_churn), float(s_min), float(s_max), float(s_noise)
        self.steps = int(steps)
        self.sigmas = edm_sigmas(self.sigma_max, self.sigma_min, self.steps, self.rho)
        g = min(self.s_churn / self.steps, math.sqrt(2) - 1)
        self.gammas = [g if self.s_min <= s <= self.s_max and g > 0 else 0.0 for s in self.sigmas[:-1]]
        self.timesteps: list[int] = list(range(self.steps))

    def denoiser(self, x: torch.Tensor, sigma: float, eps_fn: Callable | None = None) -> torch.Tensor:
        """D(x; sigma) = x - sigma eps(x / sqrt(1 + sigma^2), i(sigma)) (VP preconditioning; on EDM's
        own network, EDMPrecond's denoiser: see :mod:`dbprepro.purifiers.continuous`)."""
        return x - sigma * (eps_fn or self.eps)(x / math.sqrt(1 + sigma * sigma), sigma)

    def diffuse(self, x01, ids, draws):
        eps = self.randomness.normal(ids, draws, Stream.FORWARD, self.t_start, x01.shape[1:],
                                     device=x01.device, dtype=x01.dtype)
        return (x01 * 2 - 1) + self.sigma_max * eps

    def reverse_step(self, x, i, ids, draws, eps_fn=None):
        """Step i of Algorithm 2: churn (CHURN, i) where gamma_i > 0, Euler, Heun correction if sigma_{i+1} > 0."""
        sigma, sigma_next, gamma = self.sigmas[i], self.sigmas[i + 1], self.gammas[i]
        eps_fn = eps_fn or self.eps
        if gamma > 0:
            sigma_hat = sigma * (1 + gamma)
            z = self.randomness.normal(ids, draws, Stream.CHURN, i, x.shape[1:], device=x.device, dtype=x.dtype)
            x = x + math.sqrt(sigma_hat**2 - sigma**2) * self.s_noise * z
        else:
            sigma_hat = sigma
        d = (x - self.denoiser(x, sigma_hat, eps_fn)) / sigma_hat
        x_next = x + (sigma_next - sigma_hat) * d
        if sigma_next > 0:
            d2 = (x_next - self.denoiser(x_next, sigma_next, eps_fn)) / sigma_next
            x_next = x + (sigma_next - sigma_hat) * (d + d2) / 2
        return x_next

    @property
    def num_network_calls(self) -> int:
        """UNet evaluations of one purification: 2 per Heun step, 1 on the last (Euler) step."""
        return 2 * self.steps - 1

    def _grid_sigmas(self):
        return list(self.sigmas)

    def _vp_state(self, x, k):
        return x / math.sqrt(1 + self.sigmas[k] ** 2)


def edm_sigmas(sigma_max: float, sigma_min: float, steps: int, rho: float = 7.0) -> list[float]:
    """EDM's time steps: N noise levels from sigma_max to sigma_min (rho spacing), then 0."""
    if steps == 1:
        return [float(sigma_max), 0.0]
    a, b = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
    return [(a + i / (steps - 1) * (b - a)) ** rho for i in range(steps)] + [0.0]
