"""Diffusion-based purification (DBP) with explicit randomness and exact gradients.

A :class:`Purifier` diffuses its input to t* and runs the reverse chain back to 0:

    x_{t*} = sqrt(abar_{t*}) x + sqrt(1 - abar_{t*}) eps,        eps ~ Randomness(FORWARD, t*)
    x_{t_{k+1}} = step(eps_theta(x_{t_k}, t_k), t_k, x_{t_k}; z_{t_k}),  z ~ Randomness(REVERSE, t_k)

with the maths of diffusers' ``DDPMScheduler`` (ancestral sampling, variance type from the
scheduler config, e.g. ``fixed_large`` = beta_t as in paper 1) or ``DDIMScheduler`` (eta = 0:
deterministic given eps).  Images are in [0, 1] at the API and in [-1, 1] inside.

Gradients (``grad_mode``)
------------------------
``"exact"`` (default)
    The exact gradient of the whole chain with per-step recomputation: the forward pass keeps
    only the chain states x_{t_k} (one image-sized tensor per step, no activations) and the
    backward pass re-runs one step at a time under autograd, regenerating that step's noise
    from the replayable :class:`~dbprepro.randomness.Randomness`.  Activation memory is that
    of a single UNet call, whatever the number of steps.
``"autograd"``
    Plain autograd through every step (the reference the tests compare against; memory grows
    with the number of steps).
``"checkpoint"``
    ``torch.utils.checkpoint`` around each UNet call (paper 1's official approach); exact too.
``"bpda"``
    Backward pass as identity (BPDA, Athalye et al. 2018): cheap and weak, for baselines only.

The purifier's own weights never receive gradients through the chain (it is frozen).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Literal, NamedTuple

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .randomness import Randomness, Stream

GradMode = Literal["exact", "autograd", "checkpoint", "bpda"]
Sampler = Literal["ddpm", "ddim"]
GRAD_MODES = ("exact", "autograd", "checkpoint", "bpda")
SAMPLERS = ("ddpm", "ddim")


def start_timestep(t_star: float, num_train_timesteps: int) -> int:
    """Integer diffusion timestep of t* (0.1 of 1000 steps -> 100)."""
    if not 0.0 < float(t_star) <= 1.0:
        raise ValueError(f"t_star must lie in (0, 1], got {t_star}")
    return min(int(round(float(t_star) * num_train_timesteps)), num_train_timesteps - 1)


class ReverseChain(nn.Module):
    """The reverse chain and its gradient modes, shared by every purifier family (DDPM/DDIM here,
    VP-SDE and EDM in :mod:`dbprepro.continuous`).  A subclass provides ``eps(x, level)``,
    ``reverse_step(x, key, ids, draws, eps_fn=None)``, ``timesteps`` (the step keys, in order)
    and ``grad_mode``; ``_adjoint_chain`` where it offers ``grad_mode="adjoint"``."""

    def _eps_checkpointed(self, x: torch.Tensor, level) -> torch.Tensor:
        return checkpoint(self.eps, x, level, use_reentrant=False)

    def denoise(self, x_t: torch.Tensor, ids: torch.Tensor, draws: torch.Tensor) -> torch.Tensor:
        """The reverse chain from x_{t*} to x_0 (model space), with the configured gradient."""
        if not (torch.is_grad_enabled() and x_t.requires_grad):
            with torch.no_grad():
                return self._run_chain(x_t, ids, draws)
        if self.grad_mode == "exact":
            return _ExactChain.apply(x_t, self, ids, draws)
        if self.grad_mode == "adjoint":
            return self._adjoint_chain(x_t, ids, draws)
        eps_fn = self._eps_checkpointed if self.grad_mode == "checkpoint" else None
        return self._run_chain(x_t, ids, draws, eps_fn=eps_fn)

    def _adjoint_chain(self, x_t, ids, draws):
        raise ValueError(f"grad_mode 'adjoint' is not available for {type(self).__name__}")

    def _run_chain(self, x, ids, draws, eps_fn=None, keep_states: list | None = None):
        for key in self.timesteps:
            if keep_states is not None:
                keep_states.append(x)
            x = self.reverse_step(x, key, ids, draws, eps_fn=eps_fn)
        return x


class Purifier(ReverseChain):
    """Diffuse to t*, then denoise back with the reverse chain (see the module docstring).

    Args:
        unet: an epsilon-prediction network ``unet(x, t).sample`` (diffusers ``UNet2DModel``).
        scheduler: a diffusers ``DDPMScheduler`` (its config fixes betas and variance type).
        t_star: diffusion strength in (0, 1]; 0.1 = timestep 100 of 1000.
        num_inference_steps: length of the full schedule the chain is cut from; the chain is
            the timesteps <= t* of ``scheduler.set_timesteps(num_inference_steps)`` (1000 ->
            101 steps from t = 100, as in paper 1's DDPM-1000; 100 -> 11 steps).
        sampler: ``"ddpm"`` (ancestral) or ``"ddim"``.
        eta: DDIM eta (0 = deterministic reverse chain).
        randomness: the noise source; default ``Randomness(seed=0, mode="random")``.
        grad_mode: see the module docstring.
        clip_output: clamp the purified image to [0, 1].
    """

    def __init__(self, unet: nn.Module, scheduler, t_star: float = 0.1,
                 num_inference_steps: int | None = None, sampler: Sampler = "ddpm",
                 eta: float = 0.0, randomness: Randomness | None = None,
                 grad_mode: GradMode = "exact", clip_output: bool = True):
        super().__init__()
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

    # -- construction -----------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path: str | Path, **kwargs) -> "Purifier":
        """Build from a diffusers folder holding ``unet/`` and ``scheduler/`` (or a pipeline)."""
        from .models.diffusion import load_diffusion

        unet, scheduler = load_diffusion(path)
        return cls(unet, scheduler, **kwargs)

    @property
    def num_steps(self) -> int:
        """Number of reverse steps (UNet calls) of one purification."""
        return len(self.timesteps)

    @property
    def num_network_calls(self) -> int:
        """UNet evaluations of one purification (every purifier family has this count; the
        config-side count, before any model is built, is :func:`dbprepro.cost.network_calls`)."""
        return self.num_steps

    # -- the chain ----------------------------------------------------------------------------
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

    # -- the API ------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, ids: torch.Tensor | None = None,
                draws: torch.Tensor | None = None) -> torch.Tensor:
        """Purify images ``x`` in [0, 1], shape [B, C, H, W].

        ``ids`` name the samples (default ``0..B-1``); ``draws`` pick the randomness draw per
        sample (default: ``self.randomness.next_draws(ids)``, fresh in random mode, the fixed
        configuration in fixed mode).  Returns the purified images in [0, 1].
        """
        check_images(x)
        ids = default_ids(x, ids)
        if draws is None:
            draws = self.randomness.next_draws(ids)
        draws = torch.as_tensor(draws, dtype=torch.long).reshape(-1)
        if draws.numel() != x.shape[0]:
            raise ValueError(f"got {draws.numel()} draws for a batch of {x.shape[0]} images")
        if self.grad_mode == "bpda" and torch.is_grad_enabled() and x.requires_grad:
            # BPDA: forward is the real purification, backward is the identity.
            with torch.no_grad():
                out = self._purify(x, ids, draws)
            return x + (out - x).detach()
        return self._purify(x, ids, draws)

    @torch.no_grad()
    def trajectory(self, x: torch.Tensor, ids: torch.Tensor | None = None,
                   draws: torch.Tensor | None = None) -> "Trajectory":
        """Every state of one purification, in [0, 1] image units (not clamped): the input, the
        forward path at the chain's timesteps up to t* (same noise as the purification, see
        :meth:`diffuse`), then the state after each reverse step.  The last state, clamped when
        ``clip_output``, is exactly ``self(x, ids, draws)``.  ``draws`` default to the fixed
        configuration / the next random draws, as in :meth:`forward`.
        """
        check_images(x)
        ids = default_ids(x, ids)
        if draws is None:
            draws = self.randomness.next_draws(ids)
        draws = torch.as_tensor(draws, dtype=torch.long).reshape(-1)
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

    def _purify(self, x, ids, draws):
        out = (self.denoise(self.diffuse(x, ids, draws), ids, draws) + 1) / 2
        return out.clamp(0, 1) if self.clip_output else out


class Trajectory(NamedTuple):
    """States of one purification (:meth:`Purifier.trajectory`): ``phase[i]`` is ``input``,
    ``forward`` or ``reverse``; ``t[i]`` the diffusion timestep of ``states[i]`` ([B, C, H, W],
    [0, 1] units; the input and the final reverse state are at t = 0)."""

    phase: list[str]
    t: list[int]
    states: list[torch.Tensor]


class _ExactChain(torch.autograd.Function):
    """Exact gradient of the reverse chain by per-step recomputation (see module docstring)."""

    @staticmethod
    def forward(ctx, x_t, purifier: Purifier, ids, draws):
        states: list[torch.Tensor] = []
        with torch.no_grad():
            out = purifier._run_chain(x_t.detach(), ids, draws, keep_states=states)
        ctx.purifier, ctx.ids, ctx.draws, ctx.states = purifier, ids, draws, states
        return out

    @staticmethod
    def backward(ctx, grad_out):
        p: Purifier = ctx.purifier
        g = grad_out
        for t, x in zip(reversed(p.timesteps), reversed(ctx.states)):
            with torch.enable_grad():
                xi = x.detach().requires_grad_(True)
                out = p.reverse_step(xi, t, ctx.ids, ctx.draws)
                (g,) = torch.autograd.grad(out, xi, g)
        ctx.states = None
        return g, None, None, None


def default_ids(x: torch.Tensor, ids) -> torch.Tensor:
    """Sample ids as a long tensor; ``0..B-1`` when not given."""
    if ids is None:
        return torch.arange(x.shape[0], dtype=torch.long)
    ids = torch.as_tensor(ids, dtype=torch.long).reshape(-1).cpu()
    if ids.numel() != x.shape[0]:
        raise ValueError(f"got {ids.numel()} sample ids for a batch of {x.shape[0]} images")
    return ids


def check_images(x: torch.Tensor, channels: int | None = None, size: int | None = None) -> None:
    """Refuse what cannot be an image batch in [0, 1] with a clear message."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"images must be a torch.Tensor, got {type(x).__name__}")
    if x.ndim != 4:
        raise ValueError(f"images must have shape [B, C, H, W], got {tuple(x.shape)}")
    if x.shape[0] == 0:
        raise ValueError("empty batch: no images to purify")
    if channels is not None and x.shape[1] != channels:
        raise ValueError(f"the model expects {channels} channel(s), the images have {x.shape[1]}")
    if size is not None and tuple(x.shape[2:]) != (size, size):
        raise ValueError(f"the model expects {size}x{size} images, got {x.shape[2]}x{x.shape[3]}")
    with torch.no_grad():
        if not torch.isfinite(x).all():
            raise ValueError("images contain NaN or Inf")
        lo, hi = float(x.min()), float(x.max())
    if lo < -1e-6 or hi > 1 + 1e-6:
        raise ValueError(f"images must lie in [0, 1], got values in [{lo:.4g}, {hi:.4g}]")


class DefendedClassifier(nn.Module):
    """Classifier after purifier, an ``nn.Module`` mapping [0, 1] images to logits.

    Usable directly by torchattacks: ``forward(x)`` purifies with the purifier's randomness
    (fresh per call in random mode, always the same in fixed mode).  Sample ids (needed for
    replayable noise) are bound with :meth:`bind`; without binding they are ``0..B-1``.
    """

    def __init__(self, classifier: nn.Module, purifier: Purifier):
        super().__init__()
        self.classifier = classifier.eval()
        self.purifier = purifier
        self._ids: torch.Tensor | None = None
        self._draws: torch.Tensor | None = None
        self.eval()  # a defense is evaluated, never trained through (dropout/BatchNorm off)

    def bind(self, ids=None, draws=None) -> "_Binding":
        """Context manager: use these sample ids (and optionally draws) in ``forward(x)``."""
        return _Binding(self, ids, draws)

    def forward(self, x: torch.Tensor, ids=None, draws=None) -> torch.Tensor:
        ids = self._ids if ids is None else ids
        draws = self._draws if draws is None else draws
        return self.classifier(self.purifier(x, ids=ids, draws=draws))


class _Binding:
    def __init__(self, model: DefendedClassifier, ids, draws):
        self.model, self.ids, self.draws = model, ids, draws

    def __enter__(self):
        self.saved = (self.model._ids, self.model._draws)
        self.model._ids = None if self.ids is None else torch.as_tensor(self.ids, dtype=torch.long)
        self.model._draws = None if self.draws is None else torch.as_tensor(self.draws, dtype=torch.long)
        return self.model

    def __exit__(self, *exc):
        self.model._ids, self.model._draws = self.saved
        return False
