"""The DDPM and DDIM purifiers (paper 1's DDPM family; both papers' main purifier).

    x_{t*} = sqrt(abar_{t*}) x + sqrt(1 - abar_{t*}) eps,        eps ~ Randomness(FORWARD, t*)
    x_{t_{k+1}} = step(eps_theta(x_{t_k}, t_k), t_k, x_{t_k}; z_{t_k}),  z ~ Randomness(REVERSE, t_k)

with the maths of diffusers' ``DDPMScheduler`` (ancestral sampling, variance type from the
scheduler config, e.g. ``fixed_large`` = beta_t as in paper 1) or ``DDIMScheduler`` (eta = 0:
deterministic given eps; only the forward noise is random).  Images are in [0, 1] at the API and
in [-1, 1] inside.  Gradient modes: :mod:`dbprepro.purifiers.base`.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from ..randomness import Randomness, Stream
from .base import GRAD_MODES, GradMode, ReverseChain, Trajectory, start_timestep
from .registry import register_purifier

Sampler = Literal["ddpm", "ddim"]
SAMPLERS = ("ddpm", "ddim")


def chain_length(t_star: float, num_inference_steps: int, num_train_timesteps: int = 1000) -> int:
    """Reverse steps of the DDPM/DDIM chain: the timesteps <= t_start of diffusers'
    ``set_timesteps(n)`` grid (every T // n), without building a scheduler (cost model, config)."""
    T, n = int(num_train_timesteps), int(num_inference_steps)
    t_start = start_timestep(t_star, T)
    step = T // n
    return sum(1 for i in range(n) if i * step <= t_start)


@register_purifier
class Purifier(ReverseChain):
    """Diffuse to t*, then denoise back with the DDPM (or DDIM) reverse chain.

    Args:
        unet: an epsilon-prediction network ``unet(x, t).sample`` (diffusers ``UNet2DModel``).
        scheduler: a diffusers ``DDPMScheduler`` (its config fixes betas and variance type).
        t_star: diffusion strength in (0, 1]; 0.1 = timestep 100 of 1000.
        num_inference_steps: length of the full schedule the chain is cut from; the chain is
            the timesteps <= t* of ``scheduler.set_timesteps(num_inference_steps)`` (1000 ->
            101 steps from t = 100, as in paper 1's DDPM-1000; 100 -> 11 steps).
        sampler: ``"ddpm"`` (ancestral) or ``"ddim"`` (:class:`DDIMPurifier` is the registered DDIM).
        eta: DDIM eta (0 = deterministic reverse chain).
        randomness: the noise source; default ``Randomness(seed=0, mode="random")``.
        grad_mode: see :mod:`dbprepro.purifiers.base`.
        clip_output: clamp the purified image to [0, 1].
    """

    sampler = "ddpm"
    forward_path = True

    def __init__(self, unet: nn.Module, scheduler, t_star: float = 0.1,
                 num_inference_steps: int | None = None, sampler: Sampler | None = None,
                 eta: float = 0.0, randomness: Randomness | None = None,
                 grad_mode: GradMode = "exact", clip_output: bool = True):
        super().__init__()
        sampler = sampler or type(self).sampler
        if sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
        if grad_mode not in GRAD_MODES:
            raise ValueError(f"grad_mode must be one of {GRAD_MODES}, got {grad_mode!r}")
        if eta < 0:
            raise ValueError(f"eta must be >= 0, got {eta}")
        self.unet = unet.eval().requires_grad_(False)
        T = int(scheduler.config.num_train_timesteps)
        n = int(num_inference_steps or T)
        if not 1 <= n <= T:
            raise ValueError(f"num_inference_steps must lie in [1, {T}], got {n}")
        if sampler == "ddim":
            from diffusers import DDIMScheduler

            scheduler = DDIMScheduler.from_config(scheduler.config)
        else:
            from diffusers import DDPMScheduler

            scheduler = DDPMScheduler.from_config(scheduler.config)
        scheduler.set_timesteps(n)
        self.scheduler = scheduler
        self.sampler: Sampler = sampler
        self.eta = float(eta)
        self.t_star = float(t_star)
        self.t_start = start_timestep(t_star, T)
        self.timesteps: list[int] = [int(t) for t in scheduler.timesteps if int(t) <= self.t_start]
        if not self.timesteps or self.timesteps[0] != self.t_start:
            raise ValueError(
                f"t*={t_star} (timestep {self.t_start}) is not on the grid of {n} inference steps "
                f"(step {T // n}); choose num_inference_steps so that {self.t_start} is a multiple of {T // n}"
            )
        self.randomness = randomness if randomness is not None else Randomness(0, "random")
        self.grad_mode: GradMode = grad_mode
        self.clip_output = bool(clip_output)
        abar = scheduler.alphas_cumprod[self.t_start].to(torch.float64)
        self._sqrt_abar = float(abar.sqrt())
        self._sqrt_1m_abar = float((1 - abar).sqrt())

    # -- the family contract --------------------------------------------------------------------
    @classmethod
    def config_kwargs(cls, purification: dict[str, Any]) -> dict[str, Any]:
        return dict(num_inference_steps=purification.get("num_inference_steps"), eta=purification.get("eta", 0.0))

    @classmethod
    def network_calls(cls, purification: dict[str, Any], num_train_timesteps: int = 1000) -> int:
        return chain_length(purification["t_star"], purification["num_inference_steps"], num_train_timesteps)

    @classmethod
    def check_config(cls, cfg: dict[str, Any]) -> None:
        pur = cfg["purification"]
        T, n = cfg["diffusion"]["schedule"]["num_train_timesteps"], pur["num_inference_steps"]
        if n > T:
            raise ValueError(f"config key purification.num_inference_steps: {n} exceeds the {T} training timesteps")
        t_start = start_timestep(pur["t_star"], T)
        if t_start < 1:
            raise ValueError(f"config key purification.t_star: {pur['t_star']} rounds to timestep 0 of {T}: "
                             "nothing to purify")
        if t_start % (T // n):
            raise ValueError(f"config key purification.num_inference_steps: t*={pur['t_star']} (timestep {t_start}) "
                             f"is not on the grid of {n} steps (every {T // n}); pick a value such that {T // n} "
                             f"divides {t_start}")

    # -- construction ---------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path: str | Path, **kwargs) -> "Purifier":
        """Build from a diffusers folder holding ``unet/`` and ``scheduler/`` (or a pipeline)."""
        from ..models.diffusion import load_diffusion

        unet, scheduler = load_diffusion(path)
        return cls(unet, scheduler, **kwargs)

    @property
    def num_network_calls(self) -> int:
        """UNet evaluations of one purification (= :meth:`network_calls` of its config)."""
        return self.num_steps

    # -- the chain ------------------------------------------------------------------------------
    def diffuse(self, x01: torch.Tensor, ids: torch.Tensor, draws: torch.Tensor,
                t: int | None = None) -> torch.Tensor:
        """Forward diffusion of [0, 1] images to x_{t*} (in [-1, 1] model space).

        With ``t`` (a timestep <= t*): x_t = sqrt(abar_t) x + sqrt(1 - abar_t) eps with the *same*
        eps as x_{t*}, i.e. the point at time t of the forward path that ends at the purifier's
        x_{t*} (used by :meth:`trajectory`; the purification itself only needs t = t*).
        """
        x = x01 * 2 - 1
        eps = self.randomness.normal(ids, draws, Stream.FORWARD, self.t_start, x.shape[1:],
                                     device=x.device, dtype=x.dtype)
        if t is None or int(t) == self.t_start:
            return self._sqrt_abar * x + self._sqrt_1m_abar * eps
        if not 0 <= int(t) <= self.t_start:
            raise ValueError(f"t must lie in [0, t*={self.t_start}], got {t}")
        abar = self.scheduler.alphas_cumprod[int(t)].to(torch.float64)
        return float(abar.sqrt()) * x + float((1 - abar).sqrt()) * eps

    def reverse_step(self, x: torch.Tensor, t: int, ids: torch.Tensor, draws: torch.Tensor,
                     eps_fn: Callable[[torch.Tensor, int], torch.Tensor] | None = None) -> torch.Tensor:
        """One reverse step x_t -> x_prev with the replayable noise of timestep t."""
        eps = (eps_fn or self.eps)(x, t)
        if self.sampler == "ddpm":
            gens = self.randomness.generators(ids, draws, Stream.REVERSE, t) if t > 0 else None
            if gens is not None and len(gens) == 1:
                gens = gens[0]
            return self.scheduler.step(eps, t, x, generator=gens).prev_sample
        noise = None
        if self.eta > 0:
            noise = self.randomness.normal(ids, draws, Stream.REVERSE, t, x.shape[1:],
                                           device=x.device, dtype=x.dtype)
        return self.scheduler.step(eps, t, x, eta=self.eta, variance_noise=noise).prev_sample

    def eps(self, x: torch.Tensor, t: int) -> torch.Tensor:
        """The network's noise prediction eps_theta(x, t)."""
        tt = torch.full((x.shape[0],), t, device=x.device, dtype=torch.long)
        return self.unet(x, tt).sample

    @torch.no_grad()
    def trajectory(self, x: torch.Tensor, ids: torch.Tensor | None = None,
                   draws: torch.Tensor | None = None) -> Trajectory:
        """Every state of one purification, in [0, 1] image units (not clamped): the input, the
        forward path at the chain's timesteps up to t* (same noise as the purification, see
        :meth:`diffuse`), then the state after each reverse step.  The last state, clamped when
        ``clip_output``, is exactly ``self(x, ids, draws)``.  ``draws`` default to the fixed
        configuration / the next random draws, as in :meth:`forward`.
        """
        ids, draws = self.ids_and_draws(x, ids, draws)
        traj = Trajectory([], [], [])

        def add(phase: str, t: int, state: torch.Tensor) -> None:
            traj.phase.append(phase)
            traj.t.append(int(t))
            traj.states.append(state)

        add("input", 0, x.clone())
        for t in sorted(t for t in self.timesteps if 0 < t < self.t_start):
            add("forward", t, (self.diffuse(x, ids, draws, t) + 1) / 2)
        x_t = self.diffuse(x, ids, draws)
        add("forward", self.t_start, (x_t + 1) / 2)
        kept: list[torch.Tensor] = []
        out = self._run_chain(x_t, ids, draws, keep_states=kept)  # kept[k]: the state entering step k
        for k in range(len(self.timesteps)):  # the state after reverse step k, at the next grid time
            last = k + 1 == len(self.timesteps)
            add("reverse", 0 if last else self.timesteps[k + 1], ((out if last else kept[k + 1]) + 1) / 2)
        return traj


@register_purifier
class DDIMPurifier(Purifier):
    """DDIM purification (``sampler: ddim``): the DDPM's forward noise, then DDIM's reverse chain
    on the same grid; with ``eta = 0`` the reverse chain is deterministic given x_{t*}."""

    sampler = "ddim"

    def __init__(self, unet: nn.Module, scheduler, t_star: float = 0.1, num_inference_steps: int | None = None,
                 eta: float = 0.0, randomness: Randomness | None = None, grad_mode: GradMode = "exact",
                 clip_output: bool = True):
        super().__init__(unet, scheduler, t_star=t_star, num_inference_steps=num_inference_steps, sampler="ddim",
                         eta=eta, randomness=randomness, grad_mode=grad_mode, clip_output=clip_output)
