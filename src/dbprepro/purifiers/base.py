"""What every purifier family shares: the reverse chain, its gradient modes, draws and images.

A purifier diffuses [0, 1] images to t* and runs a reverse chain back to 0; a family (DDPM, DDIM,
VP-SDE, EDM, ...) is one subclass of :class:`ReverseChain` that provides ``diffuse``,
``reverse_step``, ``eps`` and ``timesteps`` (the keys of the reverse steps, in order), and is
registered under its ``sampler`` name (:mod:`dbprepro.purifiers.registry`).

Gradients (``grad_mode``)
------------------------
``"exact"`` (default)
    The exact gradient of the whole chain with per-step recomputation: the forward pass keeps
    only the chain states (one image-sized tensor per step, no activations) and the backward
    pass re-runs one step at a time under autograd, regenerating that step's noise from the
    replayable :class:`~dbprepro.randomness.Randomness`.  Activation memory is that of a single
    network call, whatever the number of steps.
``"autograd"``
    Plain autograd through every step (the reference the tests compare against; memory grows
    with the number of steps).
``"checkpoint"``
    ``torch.utils.checkpoint`` around each network call (paper 1's official approach); exact too.
``"bpda"``
    Backward pass as identity (BPDA, Athalye et al. 2018): cheap and weak, for baselines only.
``"budget"``
    The exact gradient within a memory budget (``activation_budget_mb``, MiB): the activations of
    as many of the chain's *last* steps as fit in the budget are kept (plain autograd), the earlier
    steps are recomputed as in ``"exact"``.  One step's saved bytes are measured on the first step
    (``saved_tensors_hooks``, once per input shape, dtype and device);  ``n_keep = floor(budget /
    bytes per step)``.  Budget 0 is ``"exact"``, a budget above the whole chain's is ``"autograd"``:
    time and memory between the two.  The last steps are the kept ones because the backward pass
    starts there: it runs through their graphs at once and frees them before recomputing the
    earlier steps, so the kept activations and a recomputed step's never coexist.
``"adjoint"``
    Only where a family offers it (VP-SDE): torchsde's adjoint, an approximation.

The purifier's own weights never receive gradients through the chain (it is frozen).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any, ClassVar, Literal, NamedTuple

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..randomness import Randomness
from .recompute import STATE_GRAD_MODES, chain_states, exact_chain

GradMode = Literal["exact", "autograd", "checkpoint", "bpda", "budget"]
GRAD_MODES = ("exact", "autograd", "checkpoint", "bpda", "budget")
MIB = 2**20  #: bytes of one MiB, the unit of ``activation_budget_mb``


def frozen_storages(*modules: nn.Module) -> set[int]:
    """Data pointers of ``modules``' parameter and buffer storages: a tensor saved for backward that
    shares one (a frozen weight, saved by reference) holds no memory of its own."""
    return {t.untyped_storage().data_ptr() for m in modules for t in (*m.parameters(), *m.buffers())}


def saved_nbytes(t: torch.Tensor, frozen: set[int]) -> int:
    """Bytes a tensor saved for backward adds: 0 for a view of a ``frozen`` storage
    (:func:`frozen_storages`), else its elements' bytes."""
    return 0 if t.untyped_storage().data_ptr() in frozen else t.numel() * t.element_size()


def start_timestep(t_star: float, num_train_timesteps: int) -> int:
    """Integer diffusion timestep of t* (0.1 of 1000 steps -> 100): the one place that maps t*
    to a timestep (purifiers, config checks and the cost model all call it)."""
    if not 0.0 < float(t_star) <= 1.0:
        raise ValueError(f"t_star must lie in (0, 1], got {t_star}")
    return min(int(round(float(t_star) * num_train_timesteps)), num_train_timesteps - 1)


class ReverseChain(nn.Module):
    """The reverse chain and its gradient modes, shared by every purifier family, and the
    class-level contract of a registered family (its config section, construction, network
    calls and ADDT loss family).

    Instances map [0, 1] images to purified [0, 1] images: ``purifier(x, ids, draws)``.
    """

    #: registry key: the ``purification.sampler`` / ``families.names`` value of this family
    sampler: ClassVar[str]
    #: the ADDT loss this family's network is fine-tuned with (:func:`dbprepro.addt.make_loss_fn`)
    loss_family: ClassVar[str] = "ddpm"
    #: its own section under ``purification`` in the config (None: only the shared keys)
    config_section: ClassVar[str | None] = None
    #: the gradient modes it offers (``grad_mode``)
    grad_modes: ClassVar[tuple[str, ...]] = GRAD_MODES
    #: those of its modes in which :meth:`purify_states` delivers the chain states with gradients
    state_grad_modes: ClassVar[tuple[str, ...]] = STATE_GRAD_MODES
    #: ``diffuse(x, ids, draws, t)`` gives the input's forward-diffusion point at the timestep of the state
    #: after any reverse step, with the purification's own noise (DiffAttack's ``forward`` reference)
    forward_path: ClassVar[bool] = False
    #: the ``addt.variants`` fine-tune whose weights this family's paper purifies as its defense (ADBM:
    #: ``adbm``), when listed in ``competitors.names``; None: the vanilla weights
    paired_variant: ClassVar[str | None] = None

    randomness: Randomness
    grad_mode: str
    clip_output: bool

    # -- the family contract (class level, no model needed) -------------------------------------
    @classmethod
    def config_kwargs(cls, purification: dict[str, Any]) -> dict[str, Any]:
        """Constructor arguments of this family from the ``purification`` section, beyond the
        shared ``t_star``, ``randomness``, ``grad_mode`` and ``clip_output``."""
        section = purification.get(cls.config_section, {}) if cls.config_section else {}
        return dict(section)

    @classmethod
    def from_config(cls, unet: nn.Module, scheduler, purification: dict[str, Any],
                    randomness: Randomness | None = None, grad_mode: str | None = None) -> "ReverseChain":
        """The purifier of the ``purification`` config section (schema defaults filled in; missing
        keys fall back to paper 1's settings)."""
        p = cls(unet, scheduler, t_star=purification.get("t_star", 0.1), randomness=randomness,
                grad_mode=grad_mode or purification.get("grad_mode", "exact"),
                clip_output=purification.get("clip_output", True), **cls.config_kwargs(purification))
        p.activation_budget_mb = purification.get("activation_budget_mb")
        return p

    @classmethod
    def network_calls(cls, purification: dict[str, Any], num_train_timesteps: int = 1000) -> int:
        """Network calls of one purification with these settings (before any model is built;
        tested against the instance's ``num_network_calls``)."""
        raise NotImplementedError

    @classmethod
    def check_config(cls, cfg: dict[str, Any]) -> None:
        """Checks of the validated config that a schema cannot express, for a config that uses
        this family; raise ValueError naming the key."""

    @classmethod
    def addt_loss_kwargs(cls, purification: dict[str, Any], addt: dict[str, Any]) -> dict[str, Any]:
        """Keyword arguments of :func:`dbprepro.addt.make_loss_fn` for this family's ADDT loss."""
        return {}

    # -- randomness and inputs ------------------------------------------------------------------
    def with_randomness(self, randomness: Randomness) -> "ReverseChain":
        """The same purifier (shared network and settings) with another randomness: a shallow copy,
        so that no caller swaps ``randomness`` in place on a purifier others hold."""
        new = copy.copy(self)
        new.__dict__["randomness"] = randomness
        return new

    def with_grad_mode(self, grad_mode: str, activation_budget_mb: float | None = None) -> "ReverseChain":
        """The same purifier with another gradient mode (a shallow copy, as :meth:`with_randomness`);
        ``activation_budget_mb``, if given, sets the budget of mode ``"budget"``."""
        new = copy.copy(self)
        new.grad_mode = grad_mode  # validated by the family's setter where it has one
        if activation_budget_mb is not None:
            new.activation_budget_mb = activation_budget_mb
        return new

    # -- the activation budget (grad_mode "budget") ---------------------------------------------
    @property
    def activation_budget_mb(self) -> float | None:
        """MiB of step activations grad_mode ``"budget"`` may keep (None: unset, which that mode
        refuses; 0: none, as ``"exact"``)."""
        return self.__dict__.get("_activation_budget_mb")

    @activation_budget_mb.setter
    def activation_budget_mb(self, mb: float | None) -> None:
        if mb is not None and not (isinstance(mb, (int, float)) and float(mb) >= 0):
            raise ValueError(f"activation_budget_mb must be a number >= 0 (MiB), got {mb!r}")
        self.__dict__["_activation_budget_mb"] = None if mb is None else float(mb)

    def step_activation_bytes(self, x_t: torch.Tensor, ids: torch.Tensor, draws: torch.Tensor) -> int:
        """Bytes autograd saves for the backward pass of one reverse step at the shape of ``x_t``:
        measured on the first step (``saved_tensors_hooks``; every family's steps make the same
        network calls, only the last ones fewer, so the first one bounds them) and cached per
        shape, dtype and device.  The network's own weights, which autograd saves by reference,
        are not counted (:func:`saved_nbytes`): they add no memory, and counting them made a
        budget keep ~3.4x fewer steps than it could on the paper-size UNet (docs/performance.md)."""
        cache = self.__dict__.setdefault("_step_bytes_cache", {})
        key = (tuple(x_t.shape), x_t.dtype, str(x_t.device), self.timesteps[0])
        if key not in cache:
            total, frozen = [0], frozen_storages(self)

            def pack(t):
                total[0] += saved_nbytes(t, frozen)
                return t

            with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                self.reverse_step(x_t.detach().requires_grad_(True), self.timesteps[0], ids, draws)
            cache[key] = total[0]
        return cache[key]

    def budget_kept_steps(self, x_t: torch.Tensor, ids: torch.Tensor, draws: torch.Tensor) -> int:
        """How many of the chain's last steps keep their activations under ``activation_budget_mb``:
        ``floor(budget / bytes per step)``, at most the chain's length."""
        mb = self.activation_budget_mb
        if mb is None:
            raise ValueError("grad_mode 'budget' needs activation_budget_mb (MiB >= 0; 0 = exact)")
        if mb == 0:
            return 0
        per_step = self.step_activation_bytes(x_t, ids, draws)
        if per_step == 0:
            return self.num_steps
        return min(self.num_steps, int(mb * MIB // per_step))

    def ids_and_draws(self, x: torch.Tensor, ids, draws) -> tuple[torch.Tensor, torch.Tensor]:
        """Check the images and normalise sample ids and draws (the one place that does it):
        ids default to ``0..B-1``, draws to ``self.randomness.next_draws(ids)`` (fresh in random
        mode, the fixed configuration in fixed mode)."""
        check_images(x)
        ids = default_ids(x, ids)
        if draws is None:
            draws = self.randomness.next_draws(ids)
        draws = torch.as_tensor(draws, dtype=torch.long).reshape(-1)
        if draws.numel() != x.shape[0]:
            raise ValueError(f"got {draws.numel()} draws for a batch of {x.shape[0]} images")
        return ids, draws

    # -- the API --------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, ids: torch.Tensor | None = None,
                draws: torch.Tensor | None = None) -> torch.Tensor:
        """Purify images ``x`` in [0, 1], shape [B, C, H, W].

        ``ids`` name the samples (default ``0..B-1``); ``draws`` pick the randomness draw per
        sample (default: ``self.randomness.next_draws(ids)``).  Returns the purified images in [0, 1].
        """
        ids, draws = self.ids_and_draws(x, ids, draws)
        if self.grad_mode == "bpda" and torch.is_grad_enabled() and x.requires_grad:
            # BPDA: forward is the real purification, backward is the identity.
            with torch.no_grad():
                out = self._purify(x, ids, draws)
            return x + (out - x).detach()
        return self._purify(x, ids, draws)

    def _purify(self, x, ids, draws):
        out = (self.denoise(self.diffuse(x, ids, draws), ids, draws) + 1) / 2
        return out.clamp(0, 1) if self.clip_output else out

    def purify_states(self, x: torch.Tensor, ids: torch.Tensor | None = None, draws: torch.Tensor | None = None,
                      keep: Sequence[int] = ()) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Purify as :meth:`forward` and also return the chain states after the reverse steps
        ``keep`` (0-based step indices; model space, not clamped; the state after the last step is
        the unclamped output), differentiable under the configured ``grad_mode``.

        For attacks whose loss reads the intermediate states (DiffAttack's deviated-reconstruction
        loss), in the modes of :attr:`state_grad_modes` (:func:`~dbprepro.purifiers.recompute.chain_states`):
        ``exact`` and the recomputed steps of ``budget`` add each kept state's gradient to the running
        vector when the backward pass reaches that state's step (DiffAttack's segment-wise backward);
        in ``autograd``, ``checkpoint`` and the kept steps of ``budget`` the graph holds the states.
        ``bpda`` and ``adjoint`` have no per-step gradient and are refused.  :meth:`forward` never
        takes this path, so a plain purification costs what it did."""
        ids, draws = self.ids_and_draws(x, ids, draws)
        keep = tuple(sorted({int(k) for k in keep}))
        if keep and not 0 <= keep[0] <= keep[-1] < self.num_steps:
            raise ValueError(f"kept steps must lie in [0, {self.num_steps}), got {list(keep)}")
        out, states = chain_states(self, self.diffuse(x, ids, draws), ids, draws, keep)
        out = (out + 1) / 2
        return (out.clamp(0, 1) if self.clip_output else out), states

    @property
    def num_steps(self) -> int:
        """Number of reverse steps of one purification."""
        return len(self.timesteps)

    # -- the chain ------------------------------------------------------------------------------
    def _eps_checkpointed(self, x: torch.Tensor, level) -> torch.Tensor:
        return checkpoint(self.eps, x, level, use_reentrant=False)

    def denoise(self, x_t: torch.Tensor, ids: torch.Tensor, draws: torch.Tensor) -> torch.Tensor:
        """The reverse chain from x_{t*} to x_0 (model space), with the configured gradient."""
        if not (torch.is_grad_enabled() and x_t.requires_grad):
            with torch.no_grad():
                return self._run_chain(x_t, ids, draws)
        if self.grad_mode == "exact":
            return exact_chain(self, x_t, ids, draws, self.timesteps)
        if self.grad_mode == "budget":
            return self._budget_chain(x_t, ids, draws)
        if self.grad_mode == "adjoint":
            return self._adjoint_chain(x_t, ids, draws)
        eps_fn = self._eps_checkpointed if self.grad_mode == "checkpoint" else None
        return self._run_chain(x_t, ids, draws, eps_fn=eps_fn)

    def _adjoint_chain(self, x_t, ids, draws):
        raise ValueError(f"grad_mode 'adjoint' is not available for {type(self).__name__}")

    def _budget_chain(self, x_t, ids, draws):
        """grad_mode ``"budget"``: the first steps recomputed (:class:`~.recompute.ExactChain`), the
        last ``budget_kept_steps`` under plain autograd; the composition's gradient is the exact one."""
        split = self.num_steps - self.budget_kept_steps(x_t, ids, draws)
        x = exact_chain(self, x_t, ids, draws, self.timesteps[:split]) if split else x_t
        return self._run_chain(x, ids, draws, timesteps=self.timesteps[split:])

    def _run_chain(self, x, ids, draws, eps_fn=None, keep_states: list | None = None, timesteps=None):
        for key in self.timesteps if timesteps is None else timesteps:
            if keep_states is not None:
                keep_states.append(x)
            x = self.reverse_step(x, key, ids, draws, eps_fn=eps_fn)
        return x


class Trajectory(NamedTuple):
    """States of one purification (``purifier.trajectory``): ``phase[i]`` is ``input``,
    ``forward`` or ``reverse``; ``t[i]`` the diffusion timestep of ``states[i]`` ([B, C, H, W],
    [0, 1] units; the input and the final reverse state are at t = 0)."""

    phase: list[str]
    t: list[int]
    states: list[torch.Tensor]


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
