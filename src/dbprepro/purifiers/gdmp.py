"""GDMP: guided diffusion purification (Wang et al., arXiv 2205.14969), ``sampler: gdmp``.

DDPM purification whose every ancestral step is pulled toward the diffused input image:

    x_{t*}  = sqrt(abar_{t*}) v + sqrt(1 - abar_{t*}) xi          v = u (round 1), else the previous round's output
    ref_t   = sqrt(abar_t) u + sqrt(1 - abar_t) xi_t              (``reference: diffused``; ``input``: ref_t = u)
    x_prev  = DDPM_step(x_t; z_t) - k_t grad_{x_t} D(x_t, ref_t)
    D       = 1/2 ||x_t - ref_t||^2 per image (``guidance: mse``)  or  -sum of the SSIM map (``guidance: ssim``)
    k_t     = scale * Sigma_t * sqrt(1 - abar_t) / sqrt(abar_t)    (``schedule: gdmp``; ``constant``: k_t = scale)

u = 2x - 1 is the original input in every round (GDMP's code), xi_t a fresh draw of its own stream
(:attr:`~dbprepro.randomness.Stream.GUIDANCE`, so the DDPM's z stream is unchanged), Sigma_t the variance of
the (strided) DDPM step (``fixed_large``: its beta).  The purification repeats ``rounds`` times (GDMP's
CIFAR-10 code: 4 rounds of 36 steps); a round's output is clamped to [-1, 1] before it is diffused again.

GDMP's own code averages its MSE over the whole batch, so its pull shrinks as 1/B; here D is per image
(the output of an image never depends on the rest of the batch), and ``scale`` is that per-pixel weight:
GDMP's CIFAR-10 config (gamma 60000, eps 8/255, batch 100, 3072 pixels) is ``scale`` = 2 / (m B P) = 18.68.

**Gradients.** The state of the chain is the pair (x_t, u), concatenated along the channels, so every
gradient mode of :class:`~dbprepro.purifiers.base.ReverseChain` (per-step recomputation, budget,
checkpoint, autograd; BPDA and the surrogate on top) differentiates through the reference path too.  The
guidance gradient is an inner ``torch.autograd.grad`` with ``create_graph=True`` whenever the step itself
is differentiated, so the attack's gradient runs through the guidance term (a Hessian-vector product of
D; for MSE the affine -k_t (x_t - ref_t)).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..randomness import Randomness, Stream
from .base import Trajectory
from .ddpm import Purifier, chain_length
from .recompute import chain_states
from .registry import register_purifier

GUIDANCES = ("mse", "ssim")
SCHEDULES = ("gdmp", "constant")
REFERENCES = ("diffused", "input")
SSIM_C1, SSIM_C2 = 0.01**2, 0.03**2  # GDMP's pytorch_ssim constants (applied, as there, to [-1, 1] images)


def _gaussian_window(size: int, channels: int, sigma: float, like: torch.Tensor) -> torch.Tensor:
    r = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-r**2 / (2 * sigma**2))
    g = g / g.sum()
    w = (g[:, None] * g[None, :]).to(like)
    return w.expand(channels, 1, size, size).contiguous()


def ssim_map(x: torch.Tensor, y: torch.Tensor, window: int = 5, sigma: float = 1.5) -> torch.Tensor:
    """The SSIM map of two image batches (Gaussian window, zero padding, per channel), shape of ``x``."""
    C = x.shape[1]
    w = _gaussian_window(window, C, sigma, x)
    conv = lambda a: F.conv2d(a, w, padding=window // 2, groups=C)  # noqa: E731
    mx, my = conv(x), conv(y)
    sxx, syy, sxy = conv(x * x) - mx**2, conv(y * y) - my**2, conv(x * y) - mx * my
    return ((2 * mx * my + SSIM_C1) * (2 * sxy + SSIM_C2)) / ((mx**2 + my**2 + SSIM_C1) * (sxx + syy + SSIM_C2))


def distance(x: torch.Tensor, ref: torch.Tensor, guidance: str = "mse", window: int = 5) -> torch.Tensor:
    """GDMP's D per image: ``mse`` 1/2 ||x - ref||^2, ``ssim`` minus the sum of the SSIM map."""
    if guidance == "mse":
        return 0.5 * (x - ref).square().flatten(1).sum(1)
    return -ssim_map(x, ref, window).flatten(1).sum(1)


def guidance_gradient(x: torch.Tensor, ref: torch.Tensor, guidance: str = "mse", window: int = 5) -> torch.Tensor:
    """grad_x D(x, ref), by autograd.  When grad mode is on and ``x`` or ``ref`` requires a gradient the
    result keeps its graph (``create_graph=True``), so a gradient through the guided step differentiates
    the guidance term too; otherwise it is a plain tensor (the no-grad purification)."""
    graph = torch.is_grad_enabled() and (x.requires_grad or ref.requires_grad)
    with torch.enable_grad():
        xi = x if (graph and x.requires_grad) else x.detach().requires_grad_(True)
        (g,) = torch.autograd.grad(distance(xi, ref if graph else ref.detach(), guidance, window).sum(), xi,
                                   create_graph=graph)
    return g


@register_purifier
class GDMPPurifier(Purifier):
    """Guided DDPM purification (module docstring), ``sampler: gdmp``, settings in ``purification.gdmp``.

    Args (beyond :class:`~dbprepro.purifiers.ddpm.Purifier`'s t_star, num_inference_steps, randomness,
    grad_mode, clip_output):
        rounds: purifications in a row (GDMP: 4 on CIFAR-10).
        scale: the guidance weight (``schedule``); 0 = plain DDPM purification, bit for bit.
        guidance: ``mse`` or ``ssim``.  schedule: ``gdmp`` or ``constant``.
        reference: ``diffused`` (GDMP's CIFAR-10 code) or ``input`` (its ImageNet code).
        ssim_window: side of the SSIM window (GDMP: 11, wider than an 8x8 digit).
    """

    sampler = "gdmp"
    config_section = "gdmp"

    def __init__(self, unet: nn.Module, scheduler, t_star: float = 0.1, num_inference_steps: int | None = None,
                 rounds: int = 4, scale: float = 18.68, guidance: str = "mse", schedule: str = "gdmp",
                 reference: str = "diffused", ssim_window: int = 5, randomness: Randomness | None = None,
                 grad_mode: str = "exact", clip_output: bool = True):
        super().__init__(unet, scheduler, t_star=t_star, num_inference_steps=num_inference_steps, sampler="ddpm",
                         randomness=randomness, grad_mode=grad_mode, clip_output=clip_output)
        for name, value, known in (("guidance", guidance, GUIDANCES), ("schedule", schedule, SCHEDULES),
                                   ("reference", reference, REFERENCES)):
            if value not in known:
                raise ValueError(f"gdmp {name} must be one of {known}, got {value!r}")
        if int(rounds) < 1 or float(scale) < 0 or int(ssim_window) < 1:
            raise ValueError(f"gdmp needs rounds >= 1, scale >= 0, ssim_window >= 1; "
                             f"got {rounds}, {scale}, {ssim_window}")
        self.sampler = "gdmp"  # the DDPM maths, under its own name
        self.rounds, self.scale, self.guidance = int(rounds), float(scale), guidance
        self.schedule, self.reference, self.ssim_window = schedule, reference, int(ssim_window)
        self.T = int(self.scheduler.config.num_train_timesteps)
        self.grid: list[int] = list(self.timesteps)  # one round's DDPM timesteps
        #: the chain's step keys: round r's step at timestep t is r * T + t (its noise keys)
        self.timesteps = [r * self.T + t for r in range(self.rounds) for t in self.grid]
        self.k = {t: self._weight(t) for t in self.grid}

    def _weight(self, t: int) -> float:
        """k_t of the step at timestep t (the strided step's variance Sigma_t, as the DDPM step uses)."""
        if self.schedule == "constant":
            return self.scale
        ac = self.scheduler.alphas_cumprod.to(torch.float64)
        prev = t - self.T // self.scheduler.num_inference_steps
        a, a_prev = ac[t], (ac[prev] if prev >= 0 else torch.tensor(1.0, dtype=torch.float64))
        beta = 1 - a / a_prev
        var = beta if self.scheduler.config.variance_type == "fixed_large" else (1 - a_prev) / (1 - a) * beta
        return float(self.scale * var * (1 - a).sqrt() / a.sqrt())

    # -- the family contract --------------------------------------------------------------------
    @classmethod
    def config_kwargs(cls, purification: dict[str, Any]) -> dict[str, Any]:
        own = {k: v for k, v in (purification.get("gdmp") or {}).items() if k != "t_star"}
        return dict(num_inference_steps=purification.get("num_inference_steps"), **own)

    @staticmethod
    def own_t_star(purification: dict[str, Any]) -> dict[str, Any]:
        """The section with ``gdmp.t_star`` (GDMP's own t*, when set) as its ``t_star``."""
        own = (purification.get("gdmp") or {}).get("t_star")
        return purification if own is None else {**purification, "t_star": own}

    @classmethod
    def from_config(cls, unet: nn.Module, scheduler, purification: dict[str, Any], randomness: Randomness | None = None,
                    grad_mode: str | None = None) -> "GDMPPurifier":
        return super().from_config(unet, scheduler, cls.own_t_star(purification), randomness, grad_mode)

    @classmethod
    def network_calls(cls, purification: dict[str, Any], num_train_timesteps: int = 1000) -> int:
        rounds = (purification.get("gdmp") or {}).get("rounds", 4)
        purification = cls.own_t_star(purification)
        return rounds * chain_length(purification["t_star"], purification["num_inference_steps"], num_train_timesteps)

    @property
    def num_network_calls(self) -> int:
        return self.num_steps

    # -- the chain: the state is (x_t, u) along the channels ------------------------------------
    def diffuse(self, x01: torch.Tensor, ids: torch.Tensor, draws: torch.Tensor, t: int | None = None) -> torch.Tensor:
        """The chain's start: (x_{t*}, u) concatenated along the channels, the DDPM's diffused image and the
        input u = 2x - 1.  With ``t`` (a step key r * T + t', or a timestep of round 1): the image alone, the
        input diffused to timestep t' with the forward noise of round r (DiffAttack's ``forward`` reference of
        the state at that key)."""
        if t is None:
            return torch.cat([super().diffuse(x01, ids, draws), x01 * 2 - 1], dim=1)
        r, tp = divmod(int(t), self.T)
        if r == 0:
            return super().diffuse(x01, ids, draws, tp)
        a = self.scheduler.alphas_cumprod[tp].to(torch.float64)
        xi = self.randomness.normal(ids, draws, Stream.FORWARD, r * self.T + self.t_start, x01.shape[1:],
                                    device=x01.device, dtype=x01.dtype)
        return float(a.sqrt()) * (x01 * 2 - 1) + float((1 - a).sqrt()) * xi

    def reference_at(self, u: torch.Tensor, key: int, ids, draws) -> torch.Tensor:
        """The guidance's target at step ``key``: u diffused to its timestep with the GUIDANCE noise, or u."""
        if self.reference == "input":
            return u
        a = self.scheduler.alphas_cumprod[key % self.T].to(torch.float64)
        xi = self.randomness.normal(ids, draws, Stream.GUIDANCE, key, u.shape[1:], device=u.device, dtype=u.dtype)
        return float(a.sqrt()) * u + float((1 - a).sqrt()) * xi

    def reverse_step(self, state: torch.Tensor, key: int, ids: torch.Tensor, draws: torch.Tensor,
                     eps_fn=None) -> torch.Tensor:
        """One guided step of the (x_t, u) state; the last step of a round but the last re-diffuses."""
        C = state.shape[1] // 2
        x, u = state[:, :C], state[:, C:]
        r, t = divmod(int(key), self.T)
        eps = (eps_fn or self.eps)(x, t)
        gens = self.randomness.generators(ids, draws, Stream.REVERSE, key) if t > 0 else None
        if gens is not None and len(gens) == 1:
            gens = gens[0]
        out = self.scheduler.step(eps, t, x, generator=gens).prev_sample
        out = out - self.k[t] * guidance_gradient(x, self.reference_at(u, key, ids, draws), self.guidance,
                                                  self.ssim_window)
        if t == self.grid[-1] and r + 1 < self.rounds:  # the next round starts from this round's image
            xi = self.randomness.normal(ids, draws, Stream.FORWARD, (r + 1) * self.T + self.t_start, x.shape[1:],
                                        device=x.device, dtype=x.dtype)
            out = self._sqrt_abar * out.clamp(-1, 1) + self._sqrt_1m_abar * xi
        return torch.cat([out, u], dim=1)

    def _purify(self, x, ids, draws):
        out = (self.denoise(self.diffuse(x, ids, draws), ids, draws)[:, :x.shape[1]] + 1) / 2
        return out.clamp(0, 1) if self.clip_output else out

    def purify_states(self, x, ids=None, draws=None, keep=()):
        """As :meth:`ReverseChain.purify_states`, the states being the image part of the chain's state
        (step indices run over all rounds: round r's step j is r * steps_per_round + j)."""
        ids, draws = self.ids_and_draws(x, ids, draws)
        keep = tuple(sorted({int(k) for k in keep}))
        if keep and not 0 <= keep[0] <= keep[-1] < self.num_steps:
            raise ValueError(f"kept steps must lie in [0, {self.num_steps}), got {list(keep)}")
        C = x.shape[1]
        out, states = chain_states(self, self.diffuse(x, ids, draws), ids, draws, keep)
        out = (out[:, :C] + 1) / 2
        return (out.clamp(0, 1) if self.clip_output else out), [s[:, :C] for s in states]

    @torch.no_grad()
    def trajectory(self, x, ids=None, draws=None) -> Trajectory:
        """The states of one purification (every round's reverse steps; their timesteps within the round)."""
        ids, draws = self.ids_and_draws(x, ids, draws)
        C = x.shape[1]
        traj = Trajectory([], [], [])
        traj.phase.append("input"), traj.t.append(0), traj.states.append(x.clone())
        state = self.diffuse(x, ids, draws)
        traj.phase.append("forward"), traj.t.append(self.t_start), traj.states.append((state[:, :C] + 1) / 2)
        for n, key in enumerate(self.timesteps):
            state = self.reverse_step(state, key, ids, draws)
            last = n + 1 == len(self.timesteps)
            nxt = 0 if last else self.timesteps[n + 1] % self.T
            traj.phase.append("reverse"), traj.t.append(nxt), traj.states.append((state[:, :C] + 1) / 2)
        return traj
