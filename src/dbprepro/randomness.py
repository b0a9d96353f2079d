"""Replayable randomness for diffusion-based purification.

Both papers hinge on *which* noise the purifier uses: paper 1's deterministic white-box
(DW-box) setting fixes it and hands it to the attacker, paper 2 evaluates robustness "under
fixed randomness".  Here every noise tensor is a pure function of

    (seed, mode, stream, sample id, draw index, index)

where ``stream`` says what the noise is for (forward diffusion, a reverse step, ...), ``index``
is the diffusion timestep (or any other integer position inside the stream), ``sample id``
identifies the image (normally its index in the data split) and ``draw`` numbers the
independent purifications of that image.  Nothing is ever stored: the noise of one sample at
one step is regenerated on demand from a freshly seeded ``torch.Generator`` (CPU, so the same
numbers come out on every device), which makes the same image get exactly the same noise
whether it is purified alone, in any batch, in any order, and in the backward pass of the
exact-gradient recomputation.  A [T, B, C, H, W] noise tensor is never materialised.

Modes
-----
``"fixed"``
    Every call uses the same draw (``fixed_draw``, default 0): the purifier is a deterministic
    function P_xi of its input.  Several fixed configurations are ``fixed_draw = 0, 1, ...``.
``"random"``
    Every call uses a fresh draw per sample (a per-sample counter), so a whole random-mode
    session is still replayable from the seed.  Random draws live in a different key space
    from fixed draws, so a fresh draw never coincides with a fixed configuration.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from enum import IntEnum
from typing import Literal

import numpy as np
import torch

Mode = Literal["random", "fixed"]

_MODE_CODE = {"fixed": 1, "random": 2}


class Stream(IntEnum):
    """What a noise tensor is used for; part of the key of every draw."""

    FORWARD = 1  # eps in x_t* = sqrt(abar) x + sqrt(1 - abar) eps
    REVERSE = 2  # z_t injected by an ancestral / stochastic reverse step at timestep t
    CHURN = 3  # extra noise of samplers with churn (EDM)
    ATTACK = 4  # random starts of attacks
    PROBE = 5  # probes of gradient-free estimators (compression rate)
    TRAIN = 6  # training-time noise (ADDT)
    CORRECTOR = 7  # Langevin corrector noise of predictor-corrector samplers (VP-SDE PC)
    GUIDANCE = 8  # noise of the diffused reference of guided purification (GDMP)


_M64 = np.uint64(0xFFFFFFFFFFFFFFFF)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """Vectorised SplitMix64 finaliser (Steele et al. 2014) on uint64 arrays.

    numpy's ``SeedSequence`` does the same job (hash a tuple into a seed) but one tuple at a
    time in Python; purification needs B x steps seeds per call, so this is the smallest
    vectorised piece that does it.  Overflow is intended (arithmetic mod 2**64).
    """
    with np.errstate(over="ignore"):
        x = (x + np.uint64(0x9E3779B97F4A7C15)) & _M64
        x = ((x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)) & _M64
        x = ((x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)) & _M64
        return x ^ (x >> np.uint64(31))


def derive_seeds(seed: int, mode: Mode, stream: int, ids, draws, index: int) -> np.ndarray:
    """64-bit generator seeds for each (id, draw) pair; a pure function of all arguments."""
    ids = np.asarray(ids, dtype=np.int64).astype(np.uint64)
    draws = np.asarray(draws, dtype=np.int64).astype(np.uint64)
    ids, draws = np.broadcast_arrays(ids, draws)
    h = _splitmix64(np.full(ids.shape, np.uint64(seed & 0xFFFFFFFFFFFFFFFF), dtype=np.uint64))
    for word in (np.uint64(_MODE_CODE[mode]), np.uint64(int(stream)), ids, draws,
                 np.uint64(index & 0xFFFFFFFFFFFFFFFF)):
        h = _splitmix64(h ^ word)
    return h


class Randomness:
    """A replayable source of per-sample noise (see the module docstring).

    >>> r = Randomness(seed=0, mode="fixed")
    >>> ids = torch.arange(4)
    >>> a = r.normal(ids, r.next_draws(ids), Stream.FORWARD, 100, (1, 8, 8))
    >>> b = r.normal(ids[2:], r.next_draws(ids[2:]), Stream.FORWARD, 100, (1, 8, 8))
    >>> bool((a[2:] == b).all())
    True
    """

    def __init__(self, seed: int = 0, mode: Mode = "random", fixed_draw: int = 0):
        if mode not in _MODE_CODE:
            raise ValueError(f"randomness mode must be 'random' or 'fixed', got {mode!r}")
        if int(seed) < 0:
            raise ValueError(f"seed must be a non-negative integer, got {seed}")
        if int(fixed_draw) < 0:
            raise ValueError(f"fixed_draw must be a non-negative integer, got {fixed_draw}")
        self.seed = int(seed)
        self.mode: Mode = mode
        self.fixed_draw = int(fixed_draw)
        self._counters: dict[int, int] = defaultdict(int)

    def __repr__(self) -> str:
        extra = f", fixed_draw={self.fixed_draw}" if self.mode == "fixed" else ""
        return f"Randomness(seed={self.seed}, mode={self.mode!r}{extra})"

    # -- which draw --------------------------------------------------------------------------
    def next_draws(self, ids, k: int | None = None) -> torch.Tensor:
        """Draw indices for the next call on ``ids``: shape [B] (or [B, k] for k draws each).

        Fixed mode always returns ``fixed_draw``.  Random mode returns fresh indices and
        advances a per-sample counter, so the same sample gets new noise on every call but
        the sequence of calls is replayable from the seed.
        """
        ids_list = _as_id_list(ids)
        n = 1 if k is None else int(k)
        if self.mode == "fixed":
            out = torch.full((len(ids_list), n), self.fixed_draw, dtype=torch.long)
        else:
            rows = []
            for i in ids_list:
                start = self._counters[i]
                rows.append(list(range(start, start + n)))
                self._counters[i] = start + n
            out = torch.tensor(rows, dtype=torch.long).reshape(len(ids_list), n)
        return out[:, 0] if k is None else out

    def reset(self) -> None:
        """Forget the random-mode counters (the next call starts again at draw 0)."""
        self._counters.clear()

    # -- the noise ------------------------------------------------------------------------------
    def generators(self, ids, draws, stream: int, index: int) -> list[torch.Generator]:
        """One freshly seeded CPU generator per sample (for diffusers' ``generator=`` lists)."""
        seeds = derive_seeds(self.seed, self.mode, stream, _as_np(ids), _as_np(draws), index)
        gens = []
        for s in seeds.tolist():
            g = torch.Generator(device="cpu")
            g.manual_seed(int(s))
            gens.append(g)
        return gens

    def normal(self, ids, draws, stream: int, index: int, shape: Sequence[int],
               device: torch.device | str | None = None,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Standard normal noise of shape [B, *shape], row b a pure function of (ids[b], draws[b])."""
        gens = self.generators(ids, draws, stream, index)
        if not gens:
            return torch.empty((0, *shape), device=device, dtype=dtype)
        from diffusers.utils.torch_utils import randn_tensor  # imported here: diffusers takes ~3 s to import

        return randn_tensor((len(gens), *shape), generator=gens, device=torch.device(device or "cpu"),
                            dtype=dtype)

    def uniform(self, ids, draws, stream: int, index: int, shape: Sequence[int],
                device: torch.device | str | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Uniform [0, 1) noise of shape [B, *shape], keyed like :meth:`normal`."""
        gens = self.generators(ids, draws, stream, index)
        rows = [torch.rand(tuple(shape), generator=g, dtype=dtype) for g in gens]
        out = torch.stack(rows) if rows else torch.empty((0, *shape), dtype=dtype)
        return out.to(device or "cpu")


def _as_np(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy().astype(np.int64)
    return np.asarray(x, dtype=np.int64)


def _as_id_list(ids) -> list[int]:
    return [int(i) for i in _as_np(ids).reshape(-1)]
