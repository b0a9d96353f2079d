"""The building blocks of Score SDE's DDPM++ network (:mod:`.ddpmpp`), with the official child names.

Written from ``../shared/reference/paper-scale-networks.md`` §1.2-1.3 (and the module and parameter
names of the public Score SDE source, read but not copied).  The children carry the names under which
the official checkpoint stores them (``GroupNorm_0``, ``Conv_0``, ``Dense_0``, ``GroupNorm_1``,
``Dropout_0``, ``Conv_1``, ``Conv_2``; ``NIN_0..3`` with ``W`` and ``b``), in the official registration
order, so that a state dict of these blocks has the checkpoint's keys in the checkpoint's order.

* :func:`group_norm`: GroupNorm with min(C/4, 32) groups and eps 1e-6, as everywhere in DDPM++;
* :func:`ddpm_init_`, :func:`conv`, :func:`linear`: DDPM's initialisation (variance scaling, fan_avg,
  uniform; ``init_scale`` 0 means 1e-10, i.e. near-zero residual branches at init);
* :func:`positional_embedding`: the sinusoidal embedding of the time label, sin half first;
* :class:`NIN`: a per-pixel linear map stored as ``W`` (in, out) and ``b``;
* :class:`AttnBlock`: single-head self-attention over all pixels (``AttnBlockpp``);
* :class:`ResBlock`: the BigGAN-style residual block (``ResnetBlockBigGANpp``) with optional 2x
  nearest up- or 2x2 average down-sampling of both paths, no FIR filter.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def group_norm(channels: int) -> nn.GroupNorm:
    """DDPM++'s normalisation: min(C/4, 32) groups, eps 1e-6, affine."""
    return nn.GroupNorm(num_groups=min(channels // 4, 32), num_channels=channels, eps=1e-6)


def ddpm_init_(weight: torch.Tensor, fan_in: int, fan_out: int, scale: float = 1.0) -> torch.Tensor:
    """DDPM's initialiser, in place: uniform with variance ``scale / ((fan_in + fan_out) / 2)``
    (``scale`` 0 is taken as 1e-10, as in DDPM).  Works on the meta device (nothing is computed)."""
    scale = scale if scale != 0 else 1e-10
    bound = math.sqrt(3.0 * scale / ((fan_in + fan_out) / 2.0))
    with torch.no_grad():
        return weight.uniform_(-bound, bound)


def conv(in_ch: int, out_ch: int, kernel: int = 3, init_scale: float = 1.0) -> nn.Conv2d:
    """A stride-1 'same' convolution with DDPM's initialisation and a zero bias."""
    c = nn.Conv2d(in_ch, out_ch, kernel_size=kernel, padding=kernel // 2)
    ddpm_init_(c.weight, in_ch * kernel * kernel, out_ch * kernel * kernel, init_scale)
    nn.init.zeros_(c.bias)
    return c


def linear(in_features: int, out_features: int) -> nn.Linear:
    """A dense layer with DDPM's initialisation and a zero bias."""
    d = nn.Linear(in_features, out_features)
    ddpm_init_(d.weight, in_features, out_features)
    nn.init.zeros_(d.bias)
    return d


def positional_embedding(labels: torch.Tensor, dim: int, max_positions: float = 10000.0) -> torch.Tensor:
    """The sinusoidal embedding (B, dim) of the (fractional) labels (B,): frequencies
    ``max_positions ** (-k / (dim/2 - 1))`` for k = 0 .. dim/2 - 1, the sin half first, then the
    cos half (a zero column pads an odd ``dim``).  Computed in the labels' floating dtype (at
    float32 this is the official computation)."""
    if labels.ndim != 1:
        raise ValueError(f"the time labels must be one value per sample, got shape {tuple(labels.shape)}")
    half = dim // 2
    step = math.log(max_positions) / (half - 1)
    freqs = torch.exp(-step * torch.arange(half, dtype=labels.dtype, device=labels.device))
    args = labels[:, None] * freqs[None, :]
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=1)
    return F.pad(emb, (0, 1)) if dim % 2 else emb


class NIN(nn.Module):
    """A 1x1 linear map over channels ("network in network"), stored as the official ``W`` of shape
    (in, out) -- the transpose of a 1x1 convolution's weight -- and ``b`` (out,)."""

    def __init__(self, in_ch: int, out_ch: int, init_scale: float = 0.1):
        super().__init__()
        self.W = nn.Parameter(torch.empty(in_ch, out_ch))
        self.b = nn.Parameter(torch.zeros(out_ch))
        ddpm_init_(self.W, out_ch, in_ch, init_scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.einsum("bchw,co->bohw", x, self.W) + self.b[None, :, None, None]


class AttnBlock(nn.Module):
    """Single-head self-attention over the H*W positions (DDPM++'s ``AttnBlockpp``): GroupNorm,
    queries/keys/values by ``NIN_0/1/2``, softmax of q.k / sqrt(C) over the keys, ``NIN_3`` on the
    result, added to the input (the sum divided by sqrt 2 when ``skip_rescale``)."""

    def __init__(self, channels: int, skip_rescale: bool = True, init_scale: float = 0.0):
        super().__init__()
        self.GroupNorm_0 = group_norm(channels)
        self.NIN_0 = NIN(channels, channels)
        self.NIN_1 = NIN(channels, channels)
        self.NIN_2 = NIN(channels, channels)
        self.NIN_3 = NIN(channels, channels, init_scale=init_scale)
        self.skip_rescale = skip_rescale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, hh, ww = x.shape
        h = self.GroupNorm_0(x)
        q, k, v = (m(h).reshape(b, c, hh * ww) for m in (self.NIN_0, self.NIN_1, self.NIN_2))
        weights = torch.softmax(torch.einsum("bci,bcj->bij", q, k) * (int(c) ** -0.5), dim=-1)
        h = self.NIN_3(torch.einsum("bij,bcj->bci", weights, v).reshape(b, c, hh, ww))
        return (x + h) / math.sqrt(2.0) if self.skip_rescale else x + h


class ResBlock(nn.Module):
    """DDPM++'s BigGAN-style residual block (``ResnetBlockBigGANpp`` without FIR filters).

    Main path: GroupNorm -> SiLU -> [resample] -> ``Conv_0`` (3x3) -> + ``Dense_0``(SiLU(temb)) per
    channel -> GroupNorm -> SiLU -> dropout -> ``Conv_1`` (3x3).  Skip path: [resample] ->
    ``Conv_2`` (1x1) when the channel count changes or the block resamples, else identity.  The sum
    is divided by sqrt 2 when ``skip_rescale``.  ``up``: 2x nearest-neighbour upsampling of both
    paths; ``down``: 2x2 average pooling of both paths.
    """

    def __init__(self, in_ch: int, out_ch: int | None = None, *, temb_dim: int, up: bool = False,
                 down: bool = False, dropout: float = 0.1, skip_rescale: bool = True, init_scale: float = 0.0):
        super().__init__()
        if up and down:
            raise ValueError("a residual block resamples up or down, not both")
        out_ch = out_ch or in_ch
        self.GroupNorm_0 = group_norm(in_ch)
        self.Conv_0 = conv(in_ch, out_ch, 3)
        self.Dense_0 = linear(temb_dim, out_ch)
        self.GroupNorm_1 = group_norm(out_ch)
        self.Dropout_0 = nn.Dropout(dropout)
        self.Conv_1 = conv(out_ch, out_ch, 3, init_scale=init_scale)
        if in_ch != out_ch or up or down:
            self.Conv_2 = conv(in_ch, out_ch, 1)
        self.up, self.down, self.skip_rescale = up, down, skip_rescale
        self.in_ch, self.out_ch = in_ch, out_ch

    def _resample(self, x: torch.Tensor) -> torch.Tensor:
        if self.up:
            return F.interpolate(x, scale_factor=2.0, mode="nearest")
        if self.down:
            return F.avg_pool2d(x, kernel_size=2, stride=2)
        return x

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        h = self._resample(F.silu(self.GroupNorm_0(x)))
        x = self._resample(x)
        h = self.Conv_0(h) + self.Dense_0(F.silu(temb))[:, :, None, None]
        h = self.Conv_1(self.Dropout_0(F.silu(self.GroupNorm_1(h))))
        if hasattr(self, "Conv_2"):
            x = self.Conv_2(x)
        return (x + h) / math.sqrt(2.0) if self.skip_rescale else x + h
