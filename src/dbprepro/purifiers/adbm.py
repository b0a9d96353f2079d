"""ADBM's fast purification (Li et al., arXiv 2408.00315), ``sampler: adbm``: a few deterministic DDIM
steps from t*.

As in ADBM's official ``defensediff.py``: the input u = 2x - 1 is diffused once to the timestep of t*,
x = sqrt(abar_{t*}) u + sqrt(1 - abar_{t*}) z, then ``purification.adbm.steps`` DDIM steps (eta = 0) run
on diffusers' *trailing* grid, t = t* - 1, t* - 1 - s, ..., with stride s = t* // steps (t* = 100, 5 steps:
99, 79, 59, 39, 19; the official code, too, adds the noise at step 100 and denoises from 99).  Each step
clips its clean estimate x0_hat to [-1, 1] (``clip_denoised``; diffusers' ``clip_sample``) and moves to
the next grid timestep with the network's epsilon; after the last step abar_prev = 1, so the output is
x0_hat.  The only randomness is z: given z the purifier is deterministic.  All of ADBM's change lies in
the weights (:func:`dbprepro.addt.adbm.adbm_loss`); with the vanilla weights this is DiffPure-style DDIM-5.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..randomness import Randomness
from .base import GRAD_MODES, ReverseChain, start_timestep
from .ddpm import Purifier
from .registry import register_purifier


def adbm_timesteps(t_start: int, steps: int) -> list[int]:
    """The trailing DDIM grid of ADBM's purification: t_start - 1 - k * (t_start // steps), k < steps."""
    stride = int(t_start) // int(steps)
    if stride < 1:
        raise ValueError(f"adbm: {steps} steps do not fit below timestep {t_start}")
    return [int(t_start) - 1 - k * stride for k in range(int(steps))]


@register_purifier
class ADBMPurifier(Purifier):
    """ADBM's DDIM purification (module docstring), settings in ``purification.adbm``.

    Args: unet, scheduler, t_star, randomness, grad_mode, clip_output as :class:`Purifier`;
    ``steps`` (ADBM: 5) and ``clip_denoised`` (clip x0_hat at each step; ADBM: true).
    """

    sampler = "adbm"
    config_section = "adbm"
    paired_variant = "adbm"  # the competing defense adbm: this sampler on the addt.adbm fine-tune

    def __init__(self, unet: nn.Module, scheduler, t_star: float = 0.1, steps: int = 5, clip_denoised: bool = True,
                 randomness: Randomness | None = None, grad_mode: str = "exact", clip_output: bool = True):
        ReverseChain.__init__(self)
        if grad_mode not in GRAD_MODES:
            raise ValueError(f"grad_mode must be one of {GRAD_MODES}, got {grad_mode!r}")
        self.unet = unet.eval().requires_grad_(False)
        self.scheduler = scheduler
        T = int(scheduler.config.num_train_timesteps)
        self.t_star, self.t_start = float(t_star), start_timestep(t_star, T)
        self.timesteps = adbm_timesteps(self.t_start, steps)
        self.stride = self.t_start // int(steps)
        self.clip_denoised = bool(clip_denoised)
        self.randomness = randomness if randomness is not None else Randomness(0, "random")
        self.grad_mode = grad_mode
        self.clip_output = bool(clip_output)
        self.eta = 0.0
        abar = scheduler.alphas_cumprod[self.t_start].to(torch.float64)
        self._sqrt_abar, self._sqrt_1m_abar = float(abar.sqrt()), float((1 - abar).sqrt())

    @classmethod
    def config_kwargs(cls, purification: dict[str, Any]) -> dict[str, Any]:
        return dict(purification.get("adbm", {}))

    @classmethod
    def network_calls(cls, purification: dict[str, Any], num_train_timesteps: int = 1000) -> int:
        return int((purification.get("adbm") or {}).get("steps", 5))

    @classmethod
    def check_config(cls, cfg: dict[str, Any]) -> None:
        pur = cfg["purification"]
        steps = pur["adbm"]["steps"]
        t_start = start_timestep(pur["t_star"], cfg["diffusion"]["schedule"]["num_train_timesteps"])
        if t_start < steps:
            raise ValueError(f"config key purification.adbm.steps: {steps} DDIM steps do not fit below t* = "
                             f"{pur['t_star']} (timestep {t_start}); at most {t_start}")

    def reverse_step(self, x: torch.Tensor, t: int, ids: torch.Tensor, draws: torch.Tensor,
                     eps_fn=None) -> torch.Tensor:
        """One DDIM step (eta = 0) from timestep t to t - stride (abar = 1 below 0)."""
        eps = (eps_fn or self.eps)(x, t)
        ac = self.scheduler.alphas_cumprod
        a = ac[t].to(x.dtype)
        a_prev = ac[t - self.stride].to(x.dtype) if t - self.stride >= 0 else torch.ones((), dtype=x.dtype)
        x0 = (x - (1 - a).sqrt() * eps) / a.sqrt()
        if self.clip_denoised:
            x0 = x0.clamp(-1, 1)
        return a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps
