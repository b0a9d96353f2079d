"""What the continuous-time purifiers (VP-SDE, EDM) share: one epsilon network, matched by noise level.

Paper 1 evaluates four purifier families: DDPM and DDIM (:mod:`dbprepro.purifiers.ddpm`), the VP-SDE
of Score SDE / DiffPure (:mod:`~dbprepro.purifiers.vpsde`) and EDM (:mod:`~dbprepro.purifiers.edm`).
The two continuous ones share the ``Purifier`` API
(``purifier(x, ids, draws)`` on [0, 1] images, ``num_steps``, ``grad_mode``, ``randomness``,
``trajectory``, ``t_start``, ``unet``) and its replayable :class:`~dbprepro.randomness.Randomness`,
so fixed/random modes, batch independence, :class:`~dbprepro.purifiers.DefendedClassifier`
and every attack setting apply unchanged.

One network for every family
----------------------------
On the embedded default all families share the trained epsilon-prediction UNet with the DDPM's
discrete betas (abar_i, i = 0..T-1).  A continuous noise level is expressed as the EDM noise
level ``sigma = sqrt((1 - abar) / abar)`` (VP state ``x_vp = x_edm / sqrt(1 + sigma^2)``), and the
network is called at the *discrete timestep with the same noise level*: the fractional index i
with ``sigma_i = sigma``, by linear interpolation of ``log sigma_i`` over the discrete table
(``timestep_map="interpolate"``, the default: the sinusoidal time embedding of diffusers'
``UNet2DModel`` accepts fractional timesteps and is smooth in them) or the nearest trained
integer timestep (``"round"``).  Noise levels below the smallest trained one (sigma_0 = 0.01 for
beta_0 = 1e-4) use timestep 0, above the largest one timestep T-1.  Matching noise levels
rather than times makes the score right whatever the continuous schedule: Score SDE's own
convention (``999 t`` for a network trained on continuous t) coincides with it up to the
O(1/T) offset between the discrete and the continuous VP schedule for beta_min = 0.1,
beta_max = 20 (= T * beta_start, T * beta_end of the DDPM).

From the noise prediction:
- VP score  ``score(x_vp, t) = -eps(x_vp, i(sigma(t))) / sigma_vp(t)``;
- EDM denoiser with the standard VP preconditioning (Karras et al. 2022, Table 1: c_skip = 1,
  c_out = -sigma, c_in = 1 / sqrt(1 + sigma^2)): ``D(x; sigma) = x - sigma eps(x / sqrt(1 + sigma^2), i(sigma))``.

At paper scale a family may instead run on its own network (issue 18): an
:class:`~dbprepro.models.networks.EpsNetwork` such as Score SDE's DDPM++ (``ddpmpp``, the VP-SDE's)
or EDM's SongUNet behind EDMPrecond (``edm_songunet``, EDM's).  :meth:`ContinuousPurifier.eps` then
calls ``EpsNetwork.eps(x_vp, sigma)`` at the same EDM noise level, and the network maps sigma to its
own conditioning (DDPM++: label ``999 t`` of the continuous VP time with the network's beta_min,
beta_max; EDM: its preconditioning, ``c_in`` and ``c_noise = ln(sigma) / 4``); the timestep map
only labels the trajectory then.  Every network call of the purifiers (the score, the EDM denoiser, the adjoint's
drift, the checkpointed steps) goes through ``eps``, so randomness, gradient modes and trajectories
are the same on either network.  On EDM's network the denoiser above is EDMPrecond's own
``D(x; sigma)``, since ``EpsNetwork.eps`` is defined as ``(x - D(x; sigma)) / sigma``.  The scheduler
is still needed: it keys the forward noise (``t_start``) and derives EDM's ``sigma_max=None``.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
from torch import nn

from ..models.networks import EpsNetwork
from ..randomness import Randomness, Stream
from .base import ReverseChain, Trajectory, start_timestep

TimestepMap = Literal["interpolate", "round"]
TIMESTEP_MAPS = ("interpolate", "round")
#: DiffPure integrates the reverse SDE to t = 1e-5, never to 0 where sigma_vp = 0; the drift is
#: evaluated no closer to 0 than this (only the adjoint's backward pass evaluates it at t = 0).
T_EPS = 1e-5


class NoiseLevelMap:
    """Fractional discrete timestep of a noise level sigma (see the module docstring)."""

    def __init__(self, alphas_cumprod: torch.Tensor, mode: TimestepMap = "interpolate"):
        if mode not in TIMESTEP_MAPS:
            raise ValueError(f"timestep_map must be one of {TIMESTEP_MAPS}, got {mode!r}")
        abar = alphas_cumprod.detach().to(torch.float64).cpu()
        self.log_sigma = 0.5 * torch.log((1 - abar) / abar)  # increasing in the timestep
        if not bool((self.log_sigma[1:] > self.log_sigma[:-1]).all()):
            raise ValueError("the scheduler's noise levels are not strictly increasing")
        self.mode: TimestepMap = mode

    def __call__(self, sigma: float) -> float:
        ls = self.log_sigma
        x = math.log(max(float(sigma), 1e-300))
        if x <= float(ls[0]):
            t = 0.0
        elif x >= float(ls[-1]):
            t = float(len(ls) - 1)
        else:
            i = int(torch.searchsorted(ls, torch.tensor(x, dtype=torch.float64)))  # ls[i-1] < x <= ls[i]
            lo, hi = float(ls[i - 1]), float(ls[i])
            t = i - 1 + (x - lo) / (hi - lo)
        return float(round(t)) if self.mode == "round" else t


def edm_sigma(alpha_bar: float) -> float:
    """EDM noise level of a VP state with cumulative alpha ``alpha_bar``."""
    return math.sqrt((1 - alpha_bar) / alpha_bar)


class ContinuousPurifier(ReverseChain):
    """What the VP-SDE and EDM purifiers share: the network called by noise level, the
    ``timestep_map`` key, the ADDT loss settings, and the trajectory in VP units; ``timesteps``
    are the keys of the reverse steps, 0..n-1."""

    grad_modes: tuple[str, ...] = ("exact", "autograd", "checkpoint", "bpda", "budget")
    sampler: str

    def __init__(self, unet: nn.Module, scheduler, t_star: float, timestep_map: TimestepMap,
                 randomness: Randomness | None, grad_mode: str, clip_output: bool):
        super().__init__()
        self.unet = unet.eval().requires_grad_(False)
        self.scheduler = scheduler
        T = int(scheduler.config.num_train_timesteps)
        self.t_star = float(t_star)
        self.t_start = start_timestep(t_star, T)  # the DDPM-equivalent timestep; keys the forward noise
        self.alphas_cumprod = scheduler.alphas_cumprod.to(torch.float64)
        self.net_time = NoiseLevelMap(self.alphas_cumprod, timestep_map)
        self.randomness = randomness if randomness is not None else Randomness(0, "random")
        self.grad_mode = grad_mode
        self.clip_output = bool(clip_output)

    # -- the family contract --------------------------------------------------------------------
    @classmethod
    def config_kwargs(cls, purification: dict[str, Any]) -> dict[str, Any]:
        return dict(timestep_map=purification.get("timestep_map", "interpolate"),
                    **purification.get(cls.config_section, {}))

    @classmethod
    def addt_loss_kwargs(cls, purification: dict[str, Any], addt: dict[str, Any]) -> dict[str, Any]:
        """The continuous VP-SDE and the EDM noise distributions of the ADDT loss."""
        return dict(beta_min=purification["vpsde"]["beta_min"], beta_max=purification["vpsde"]["beta_max"],
                    timestep_map=purification["timestep_map"], p_mean=addt["edm_p_mean"], p_std=addt["edm_p_std"],
                    sigma_data=addt["edm_sigma_data"])

    @property
    def grad_mode(self) -> str:
        return self._grad_mode

    @grad_mode.setter
    def grad_mode(self, mode: str) -> None:
        if mode not in self.grad_modes:
            raise ValueError(f"grad_mode of the {self.sampler} purifier must be one of {self.grad_modes}, got {mode!r}")
        self._grad_mode = mode

    # -- the network ---------------------------------------------------------------------------
    def eps(self, x_vp: torch.Tensor, sigma: float) -> torch.Tensor:
        """eps_theta at the VP state ``x_vp`` of EDM noise level ``sigma``: a family's own network
        by :meth:`EpsNetwork.eps <dbprepro.models.networks.EpsNetwork.eps>` (its own conditioning),
        a diffusers ``UNet2DModel`` at the timestep of that noise level (module docstring)."""
        if isinstance(self.unet, EpsNetwork):
            return self.unet.eps(x_vp, sigma)
        t = self.net_time(sigma)
        dtype = torch.float32 if self.net_time.mode == "interpolate" else torch.long
        tt = torch.full((x_vp.shape[0],), t, device=x_vp.device, dtype=dtype)
        return self.unet(x_vp, tt).sample

    @torch.no_grad()
    def trajectory(self, x: torch.Tensor, ids: torch.Tensor | None = None,
                   draws: torch.Tensor | None = None) -> Trajectory:
        """Every state of one purification, as :meth:`Purifier.trajectory`: [0, 1] units of the VP
        state (``(x_vp + 1) / 2``, so all families share units), ``t`` the DDPM-equivalent
        timestep (rounded noise-level map) of each grid point; the forward states at the grid's
        noise levels share the purification's forward noise.  The last state, clamped when
        ``clip_output``, is exactly ``self(x, ids, draws)``."""
        ids, draws = self.ids_and_draws(x, ids, draws)
        traj = Trajectory([], [], [])

        def add(phase, t, state):
            traj.phase.append(phase)
            traj.t.append(int(t))
            traj.states.append(state)

        add("input", 0, x.clone())
        levels = self._grid_sigmas()  # sigma of the state entering step k, k = 0..n-1, then of the output
        eps = self.randomness.normal(ids, draws, Stream.FORWARD, self.t_start, x.shape[1:], device=x.device,
                                     dtype=x.dtype)
        for s in sorted(s for s in levels[1:-1] if s > 0):
            add("forward", round(self.net_time(s)), ((2 * x - 1 + s * eps) / math.sqrt(1 + s * s) + 1) / 2)
        x_t = self.diffuse(x, ids, draws)
        add("forward", self.t_start, (self._vp_state(x_t, 0) + 1) / 2)
        kept: list[torch.Tensor] = []
        out = self._run_chain(x_t, ids, draws, keep_states=kept)
        kept.append(out)
        for k in range(1, len(kept)):
            last = k == len(kept) - 1
            t = 0 if last else round(self.net_time(levels[k]))
            add("reverse", t, (self._vp_state(kept[k], k) + 1) / 2)
        return traj

    def _grid_sigmas(self) -> list[float]:
        raise NotImplementedError

    def _vp_state(self, x: torch.Tensor, k: int) -> torch.Tensor:
        return x


_FamilyPurifier = ContinuousPurifier  # its name before 0.2
