"""Continuous-time purifiers of paper 1: the VP-SDE of DiffPure and the EDM Heun sampler.

Paper 1 evaluates four purifier families: DDPM and DDIM (:class:`~dbprepro.purification.Purifier`),
the VP-SDE of Score SDE / DiffPure and EDM.  The two classes here share the ``Purifier`` API
(``purifier(x, ids, draws)`` on [0, 1] images, ``num_steps``, ``grad_mode``, ``randomness``,
``trajectory``, ``t_start``, ``unet``) and its replayable :class:`~dbprepro.randomness.Randomness`,
so fixed/random modes, batch independence, :class:`~dbprepro.purification.DefendedClassifier`
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

VP-SDE (``VPSDEPurifier``; DiffPure, paper 1's VP family)
--------------------------------------------------------
dx = -1/2 beta(t) x dt + sqrt(beta(t)) dW, beta(t) = beta_min + t (beta_max - beta_min); forward
``x_{t*} = alpha(t*) x + sigma_vp(t*) eps``.  The reverse SDE from t* to 0 is solved with
Euler-Maruyama on the uniform grid t_k = t* (1 - k / n), k = 0..n (DiffPure: dt = 1e-3, n = 100 at
t* = 0.1), noise at every step (as torchsde's solver in DiffPure):

    x_{k+1} = x_k + [1/2 beta(t_k) x_k + beta(t_k) score(x_k, t_k)] dt + sqrt(beta(t_k) dt) z_k.

``corrector=True`` precedes each predictor step by one Langevin corrector step (Score SDE's PC
sampler, snr 0.16, paper 1's VP evaluation); paper 1's DW-box VP script drops it.  The step size
is ``2 a (snr ||z|| / ||score||)^2`` with a = 1 - beta(t) dt, the norms *per sample* (Score SDE
averages them over the batch, which would make an image's purification depend on its batch).

Noise keys: forward eps = (FORWARD, t_start) as for DDPM (the same draw gives the families the same
forward noise), predictor z_k = (REVERSE, k), corrector noise = (CORRECTOR, k), k the step index.

diffusers' ``ScoreSdeVpScheduler`` is not used: it is deprecated, its step uses dt = -1/N while
its grid spacing is (1 - eps)/(N - 1), it has no corrector, and the adjoint needs the drift and
diffusion as functions anyway; the test suite checks our step against it on a common step.

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

Gradients (``grad_mode``)
------------------------
``exact`` (per-step recomputation, the design of :class:`~dbprepro.purification.Purifier`: only the
chain states are kept, each step's noise is regenerated in the backward pass), ``autograd``,
``checkpoint``, ``bpda`` as for ``Purifier``; for the VP-SDE (without corrector) also ``adjoint``:
torchsde's ``sdeint_adjoint`` (DiffPure's gradient) on the same SDE, driven by a Brownian path whose
increments are exactly our replayable z_k, so its forward pass equals the EM chain and only the
backward differs (the adjoint re-solves the state backwards instead of recomputing it; its
accuracy for SDEs is disputed: :func:`adjoint_agreement` measures it against ``exact``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal

import torch
from torch import nn

from .purification import (Purifier, ReverseChain, Trajectory, check_images, default_ids,
                           start_timestep)
from .randomness import Randomness, Stream

TimestepMap = Literal["interpolate", "round"]
TIMESTEP_MAPS = ("interpolate", "round")
FAMILY_SAMPLERS = ("vpsde", "edm")
ALL_SAMPLERS = ("ddpm", "ddim", "vpsde", "edm")
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


class _FamilyPurifier(ReverseChain):
    """What the VP-SDE and EDM purifiers share: the API of :class:`Purifier` on top of
    ``diffuse`` / ``reverse_step`` / ``timesteps`` (the keys of the reverse steps, 0..n-1)."""

    grad_modes: tuple[str, ...] = ("exact", "autograd", "checkpoint", "bpda")
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

    @property
    def grad_mode(self) -> str:
        return self._grad_mode

    @grad_mode.setter
    def grad_mode(self, mode: str) -> None:
        if mode not in self.grad_modes:
            raise ValueError(f"grad_mode of the {self.sampler} purifier must be one of {self.grad_modes}, got {mode!r}")
        self._grad_mode = mode

    @property
    def num_steps(self) -> int:
        """Number of reverse steps of one purification."""
        return len(self.timesteps)

    # -- the network ---------------------------------------------------------------------------
    def eps(self, x_vp: torch.Tensor, sigma: float) -> torch.Tensor:
        """eps_theta at the VP state ``x_vp`` of EDM noise level ``sigma`` (timestep by noise level)."""
        t = self.net_time(sigma)
        dtype = torch.float32 if self.net_time.mode == "interpolate" else torch.long
        tt = torch.full((x_vp.shape[0],), t, device=x_vp.device, dtype=dtype)
        return self.unet(x_vp, tt).sample

    def _draws(self, x, ids, draws):
        check_images(x)
        ids = default_ids(x, ids)
        if draws is None:
            draws = self.randomness.next_draws(ids)
        draws = torch.as_tensor(draws, dtype=torch.long).reshape(-1)
        if draws.numel() != x.shape[0]:
            raise ValueError(f"got {draws.numel()} draws for a batch of {x.shape[0]} images")
        return ids, draws

    def forward(self, x: torch.Tensor, ids: torch.Tensor | None = None,
                draws: torch.Tensor | None = None) -> torch.Tensor:
        """Purify images ``x`` in [0, 1] (same contract as :meth:`Purifier.forward`)."""
        ids, draws = self._draws(x, ids, draws)
        if self.grad_mode == "bpda" and torch.is_grad_enabled() and x.requires_grad:
            with torch.no_grad():
                out = self._purify(x, ids, draws)
            return x + (out - x).detach()
        return self._purify(x, ids, draws)

    def _purify(self, x, ids, draws):
        out = (self._to_image(self.denoise(self.diffuse(x, ids, draws), ids, draws)) + 1) / 2
        return out.clamp(0, 1) if self.clip_output else out

    def _to_image(self, x_end: torch.Tensor) -> torch.Tensor:
        """The chain's final state in [-1, 1] image space."""
        return x_end

    @torch.no_grad()
    def trajectory(self, x: torch.Tensor, ids: torch.Tensor | None = None,
                   draws: torch.Tensor | None = None) -> Trajectory:
        """Every state of one purification, as :meth:`Purifier.trajectory`: [0, 1] units of the VP
        state (``(x_vp + 1) / 2``, so all families share units), ``t`` the DDPM-equivalent
        timestep (rounded noise-level map) of each grid point; the forward states at the grid's
        noise levels share the purification's forward noise.  The last state, clamped when
        ``clip_output``, is exactly ``self(x, ids, draws)``."""
        ids, draws = self._draws(x, ids, draws)
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


# ------------------------------------------------------------------------------------------------
class VPSDEPurifier(_FamilyPurifier):
    """DiffPure's VP-SDE purification (see the module docstring).

    Args:
        unet, scheduler: the epsilon-prediction network and its discrete DDPM scheduler.
        t_star: diffusion time in (0, 1] of the continuous VP-SDE (0.1 in both papers).
        steps: Euler-Maruyama steps from t* to 0 (DiffPure: dt = 1e-3, i.e. 100 at t* = 0.1).
        beta_min, beta_max: the continuous VP-SDE (Score SDE / DiffPure: 0.1, 20).
        corrector: one Langevin corrector step before each predictor step (PC sampler).
        snr: the corrector's signal-to-noise ratio (Score SDE / paper 1: 0.16).
        timestep_map, randomness, grad_mode, clip_output: see the module docstring.
    """

    sampler = "vpsde"
    grad_modes = ("exact", "autograd", "checkpoint", "bpda", "adjoint")

    def __init__(self, unet: nn.Module, scheduler, t_star: float = 0.1, steps: int = 100,
                 beta_min: float = 0.1, beta_max: float = 20.0, corrector: bool = False, snr: float = 0.16,
                 timestep_map: TimestepMap = "interpolate", randomness: Randomness | None = None,
                 grad_mode: str = "exact", clip_output: bool = True):
        if int(steps) < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        if not 0 <= beta_min < beta_max:
            raise ValueError(f"need 0 <= beta_min < beta_max, got {beta_min}, {beta_max}")
        if snr <= 0:
            raise ValueError(f"snr must be > 0, got {snr}")
        self.corrector = bool(corrector)
        super().__init__(unet, scheduler, t_star, timestep_map, randomness, grad_mode, clip_output)
        self.steps = int(steps)
        self.beta_min, self.beta_max = float(beta_min), float(beta_max)
        self.snr = float(snr)
        self.dt = self.t_star / self.steps
        self.timesteps: list[int] = list(range(self.steps))  # step keys k; the step runs from t_k to t_{k+1}

    @_FamilyPurifier.grad_mode.setter
    def grad_mode(self, mode: str) -> None:
        _FamilyPurifier.grad_mode.fset(self, mode)
        if mode == "adjoint" and self.corrector:
            raise ValueError("grad_mode 'adjoint' needs the pure SDE: the Langevin corrector (corrector=True) "
                             "is not part of an SDE torchsde can integrate")

    # -- the SDE --------------------------------------------------------------------------------
    def time(self, k: int | float) -> float:
        """Time t_k = t* (1 - k / n) of grid point k."""
        return self.t_star * (1 - k / self.steps)

    def beta(self, t: float) -> float:
        return self.beta_min + t * (self.beta_max - self.beta_min)

    def log_alpha(self, t: float) -> float:
        """log of the mean coefficient alpha(t) = exp(-1/2 int_0^t beta)."""
        return -0.25 * t * t * (self.beta_max - self.beta_min) - 0.5 * t * self.beta_min

    def sigma_vp(self, t: float) -> float:
        return math.sqrt(-math.expm1(2 * self.log_alpha(t)))

    def sigma_edm(self, t: float) -> float:
        return self.sigma_vp(t) / math.exp(self.log_alpha(t))

    def score(self, x: torch.Tensor, t: float, eps_fn: Callable | None = None) -> torch.Tensor:
        """score(x, t) = -eps_theta / sigma_vp(t)."""
        t = max(float(t), T_EPS)
        return -(eps_fn or self.eps)(x, self.sigma_edm(t)) / self.sigma_vp(t)

    def reverse_drift(self, x: torch.Tensor, t: float, eps_fn: Callable | None = None) -> torch.Tensor:
        """Drift of the reverse-time SDE, f - g^2 score = -1/2 beta x - beta score (per unit forward time)."""
        b = self.beta(max(float(t), T_EPS))
        return -0.5 * b * x - b * self.score(x, t, eps_fn)

    def diffusion(self, t: float) -> float:
        return math.sqrt(self.beta(max(float(t), T_EPS)))

    def diffuse(self, x01, ids, draws, t: float | None = None):
        """Forward diffusion of [0, 1] images to the VP state at t* (or at ``t`` <= t*, same noise)."""
        t = self.t_star if t is None else float(t)
        eps = self.randomness.normal(ids, draws, Stream.FORWARD, self.t_start, x01.shape[1:],
                                     device=x01.device, dtype=x01.dtype)
        return math.exp(self.log_alpha(t)) * (x01 * 2 - 1) + self.sigma_vp(t) * eps

    def corrector_step(self, x, k, ids, draws, eps_fn=None):
        """One Langevin step at t_k with per-sample step size 2 a (snr ||z|| / ||score||)^2."""
        t = self.time(k)
        grad = self.score(x, t, eps_fn)
        z = self.randomness.normal(ids, draws, Stream.CORRECTOR, k, x.shape[1:], device=x.device, dtype=x.dtype)
        a = 1 - self.beta(t) * self.dt
        ratio = z.flatten(1).norm(dim=1) / grad.flatten(1).norm(dim=1)
        step = (2 * a * (self.snr * ratio) ** 2).view(-1, *([1] * (x.ndim - 1)))
        return x + step * grad + (2 * step).sqrt() * z

    def reverse_step(self, x, k, ids, draws, eps_fn=None):
        """Step k: (corrector,) then Euler-Maruyama from t_k to t_{k+1} with z_k = (REVERSE, k)."""
        if self.corrector:
            x = self.corrector_step(x, k, ids, draws, eps_fn)
        t = self.time(k)
        z = self.randomness.normal(ids, draws, Stream.REVERSE, k, x.shape[1:], device=x.device, dtype=x.dtype)
        return x - self.reverse_drift(x, t, eps_fn) * self.dt + self.diffusion(t) * math.sqrt(self.dt) * z

    def _grid_sigmas(self):
        return [self.sigma_edm(self.time(k)) for k in range(self.steps + 1)]

    @property
    def num_network_calls(self) -> int:
        """UNet evaluations of one purification: one per step, two with the corrector."""
        return self.steps * (2 if self.corrector else 1)

    # -- adjoint --------------------------------------------------------------------------------
    def _adjoint_chain(self, x_t, ids, draws):
        import torchsde

        shape = x_t.shape
        sde = _ReverseVPSDE(self, shape[1:])
        bm = _ReplayBrownian(self, ids, draws, shape, x_t.dtype, x_t.device)
        ts = torch.tensor([0.0, float(self.steps)], dtype=x_t.dtype, device=x_t.device)
        ys = torchsde.sdeint_adjoint(sde, x_t.flatten(1), ts, bm=bm, method="euler", dt=1.0,
                                     adjoint_params=())
        return ys[-1].view(shape)


class _ReverseVPSDE(nn.Module):
    """The reverse VP-SDE for torchsde in step units s = k (ds = 1, integer times, exact in floating
    point): F(s, y) = -reverse_drift(t_s) dt, G(s) = sqrt(beta(t_s) dt), t_s = t* (1 - s / n)."""

    noise_type = "diagonal"
    sde_type = "ito"

    def __init__(self, purifier: VPSDEPurifier, shape):
        super().__init__()
        self.p, self.shape = purifier, tuple(shape)

    def f(self, s, y):
        x = y.view(-1, *self.shape)
        return (-self.p.reverse_drift(x, self.p.time(float(s))) * self.p.dt).flatten(1)

    def g(self, s, y):
        return torch.full_like(y, self.p.diffusion(self.p.time(float(s))) * math.sqrt(self.p.dt))


class _ReplayBrownian:
    """A torchsde Brownian motion on the integer grid whose unit increments W(k+1) - W(k) are the
    purifier's replayable z_k = (REVERSE, k): nothing stored, the same noise as the EM chain."""

    def __init__(self, p: VPSDEPurifier, ids, draws, shape, dtype, device):
        self.p, self.ids, self.draws = p, ids, draws
        self.img_shape, self._dtype, self._device = tuple(shape[1:]), dtype, device
        self._shape = (shape[0], math.prod(shape[1:]))

    def __call__(self, ta, tb=None, return_U=False, return_A=False):
        if tb is None or return_U or return_A:
            raise ValueError("the replayed Brownian path only answers increments W(tb) - W(ta)")
        a, b = float(ta), float(tb)
        ka, kb = round(a), round(b)
        if abs(a - ka) > 1e-6 or abs(b - kb) > 1e-6:
            raise ValueError(f"the replayed Brownian path is defined on the integer step grid, got ({a}, {b})")
        sign, lo, hi = (1.0, ka, kb) if kb >= ka else (-1.0, kb, ka)
        out = torch.zeros(self._shape, dtype=self._dtype, device=self._device)
        for k in range(lo, hi):
            out = out + self.p.randomness.normal(self.ids, self.draws, Stream.REVERSE, k, self.img_shape,
                                                 device=self._device, dtype=self._dtype).flatten(1)
        return sign * out

    def __repr__(self):
        return f"_ReplayBrownian(steps={self.p.steps})"

    dtype = property(lambda self: self._dtype)
    device = property(lambda self: self._device)
    shape = property(lambda self: self._shape)
    levy_area_approximation = "none"

    def size(self):
        return self._shape


# ------------------------------------------------------------------------------------------------
class EDMPurifier(_FamilyPurifier):
    """EDM purification: Heun sampler with stochastic churn (see the module docstring).

    Args:
        unet, scheduler: the epsilon-prediction network (VP preconditioning) and its scheduler.
        t_star: diffusion strength; keys the forward noise and, with ``sigma_max=None``, sets the
            starting noise level to the DDPM's at t_start.
        sigma_max: starting noise level (paper 1: 0.5) or None (derived from t*).
        steps: N, the Heun steps (paper 1: 50); N - 1 of them take the second-order correction.
        sigma_min, rho: the EDM grid (0.002, 7).
        s_churn, s_min, s_max, s_noise: stochastic churn (paper 1: 6, 0.01, 0.46, 1.007).
    """

    sampler = "edm"

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
        """D(x; sigma) = x - sigma eps(x / sqrt(1 + sigma^2), i(sigma)) (VP preconditioning)."""
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


# ------------------------------------------------------------------------------------------------
def make_purifier(unet: nn.Module, scheduler, purification: dict, randomness: Randomness,
                  grad_mode: str | None = None):
    """The purifier of any family from the ``purification`` config section (schema defaults
    assumed filled in; missing family sections fall back to paper 1's settings)."""
    sampler = purification.get("sampler", "ddpm")
    grad_mode = grad_mode or purification.get("grad_mode", "exact")
    common = dict(t_star=purification.get("t_star", 0.1), randomness=randomness, grad_mode=grad_mode,
                  clip_output=purification.get("clip_output", True))
    if sampler in ("ddpm", "ddim"):
        return Purifier(unet, scheduler, num_inference_steps=purification.get("num_inference_steps"),
                        sampler=sampler, eta=purification.get("eta", 0.0), **common)
    tmap = purification.get("timestep_map", "interpolate")
    if sampler == "vpsde":
        return VPSDEPurifier(unet, scheduler, timestep_map=tmap, **purification.get("vpsde", {}), **common)
    if sampler == "edm":
        return EDMPurifier(unet, scheduler, timestep_map=tmap, **purification.get("edm", {}), **common)
    raise ValueError(f"purification.sampler must be one of {ALL_SAMPLERS}, got {sampler!r}")


# ------------------------------------------------------------------------------------------------
def adjoint_agreement(purifier: VPSDEPurifier, x: torch.Tensor, weights: torch.Tensor,
                      ids: torch.Tensor | None = None, draws: torch.Tensor | None = None) -> dict:
    """Gradient of ``sum(purifier(x) * weights)`` w.r.t. ``x`` by the adjoint and by the exact
    step-wise method, on the same draws: relative L2 error, cosine, and the forward mismatch
    (:func:`dbprepro.gradients.mode_gradients`, as every gradient-mode comparison)."""
    from .gradients import gradient_agreement, mode_gradients

    res = mode_gradients(purifier, x, lambda out: (out * weights).sum(), ("exact", "adjoint"), ids=ids, draws=draws)
    agree = gradient_agreement(res["adjoint"]["grad"], res["exact"]["grad"])
    return {
        "steps": purifier.steps, "dt": purifier.dt,
        "rel_error": agree["rel_error"], "cosine": agree["cosine"], "norm_ratio": agree["norm_ratio"],
        "forward_max_abs_diff": float((res["adjoint"]["out"] - res["exact"]["out"]).abs().max()),
        "grad_exact": res["exact"]["grad"], "grad_adjoint": res["adjoint"]["grad"],
    }
