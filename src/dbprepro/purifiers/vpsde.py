"""DiffPure's VP-SDE purifier (paper 1's VP family), with the exact and the adjoint gradient.

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

Gradients (``grad_mode``)
------------------------
``exact`` (per-step recomputation, the design of :mod:`dbprepro.purifiers.base`: only the
chain states are kept, each step's noise is regenerated in the backward pass), ``autograd``,
``checkpoint``, ``budget``, ``bpda`` as for ``Purifier``; for the VP-SDE (without corrector) also ``adjoint``:
torchsde's ``sdeint_adjoint`` (DiffPure's gradient) on the same SDE, driven by a Brownian path whose
increments are exactly our replayable z_k, so its forward pass equals the EM chain and only the
backward differs (the adjoint re-solves the state backwards instead of recomputing it; its
accuracy for SDEs is disputed: :func:`adjoint_agreement` measures it against ``exact``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ..randomness import Randomness, Stream
from .continuous import T_EPS, ContinuousPurifier, TimestepMap
from .registry import register_purifier


@register_purifier
class VPSDEPurifier(ContinuousPurifier):
    """DiffPure's VP-SDE purification (see the module docstring).

    Args:
        unet, scheduler: the epsilon-prediction network (a diffusers ``UNet2DModel`` or the family's
            own :class:`~dbprepro.models.networks.EpsNetwork`, e.g. DDPM++) and the discrete DDPM scheduler.
        t_star: diffusion time in (0, 1] of the continuous VP-SDE (0.1 in both papers).
        steps: Euler-Maruyama steps from t* to 0 (DiffPure: dt = 1e-3, i.e. 100 at t* = 0.1).
        beta_min, beta_max: the continuous VP-SDE (Score SDE / DiffPure: 0.1, 20).
        corrector: one Langevin corrector step before each predictor step (PC sampler).
        snr: the corrector's signal-to-noise ratio (Score SDE / paper 1: 0.16).
        timestep_map, randomness, grad_mode, clip_output: see the module docstring.
    """

    sampler = "vpsde"
    loss_family = "vp"
    config_section = "vpsde"
    grad_modes = ("exact", "autograd", "checkpoint", "bpda", "budget", "adjoint")

    @classmethod
    def network_calls(cls, purification: dict[str, Any], num_train_timesteps: int = 1000) -> int:
        vp = purification["vpsde"]
        return int(vp["steps"]) * (2 if vp["corrector"] else 1)

    @classmethod
    def check_config(cls, cfg: dict[str, Any]) -> None:
        pur = cfg["purification"]
        if pur["vpsde"]["beta_max"] <= pur["vpsde"]["beta_min"]:
            raise ValueError("config key purification.vpsde.beta_max: must be larger than beta_min")
        if pur["sampler"] == cls.sampler and pur["grad_mode"] == "adjoint" and pur["vpsde"]["corrector"]:
            raise ValueError("config key purification.grad_mode: adjoint needs the pure SDE, without "
                             "purification.vpsde.corrector")

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

    @ContinuousPurifier.grad_mode.setter
    def grad_mode(self, mode: str) -> None:
        ContinuousPurifier.grad_mode.fset(self, mode)
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



def adjoint_agreement(purifier: VPSDEPurifier, x: torch.Tensor, weights: torch.Tensor,
                      ids: torch.Tensor | None = None, draws: torch.Tensor | None = None) -> dict:
    """Gradient of ``sum(purifier(x) * weights)`` w.r.t. ``x`` by the adjoint and by the exact
    step-wise method, on the same draws: relative L2 error, cosine, and the forward mismatch
    (:func:`dbprepro.purifiers.gradients.mode_gradients`, as every gradient-mode comparison)."""
    from .gradients import gradient_agreement, mode_gradients

    res = mode_gradients(purifier, x, lambda out: (out * weights).sum(), ("exact", "adjoint"), ids=ids, draws=draws)
    agree = gradient_agreement(res["adjoint"]["grad"], res["exact"]["grad"])
    return {
        "steps": purifier.steps, "dt": purifier.dt,
        "rel_error": agree["rel_error"], "cosine": agree["cosine"], "norm_ratio": agree["norm_ratio"],
        "forward_max_abs_diff": float((res["adjoint"]["out"] - res["exact"]["out"]).abs().max()),
        "grad_exact": res["exact"]["grad"], "grad_adjoint": res["adjoint"]["grad"],
    }
