"""EDM's DDPM++-style network (SongUNet) behind EDM's preconditioning: the EDM family's paper-scale
network (issue 18).

Which network.  NVlabs' ``edm-cifar10-32x32-uncond-vp.pkl`` (paper 1's EDM rows): the README's
training options for it are ``--cond=0 --arch=ddpmpp`` with the default ``--precond=edm``, so the
pickle holds an ``EDMPrecond`` around a ``SongUNet``.  "vp" names the architecture family (DDPM++,
config F), not the preconditioning (``../shared/reference/paper-scale-networks.md`` §2.1; the section
numbers below are that page's).  Re-implemented here from that description; the EDM source
(CC BY-NC-SA 4.0) was only read for module names, shapes and hyper-parameters, and no code of it is
used.  No weights are shipped: the official pickle is fetched and pinned elsewhere and read safely by
:meth:`EDMSongUNet.load_state` (:mod:`.edm_pickle`: a restricted unpickler, nothing executed).

The choices, and what each follows:

* hyper-parameters (§2.2, :data:`PAPER_CONFIG`): 128 base channels, channel multipliers (2, 2, 2)
  (256 channels at 32, 16 and 8), embedding 4 x 128 = 512, 4 blocks per level, attention at 16x16,
  dropout 0.13 (training only), positional noise embedding with endpoint, resample filter [1, 1]
  (2x2 box: average-pool down, nearest up), ``augment_dim`` 9 (a bias-free ``map_augment`` Linear
  9 -> 128, trained with augmentation labels and unused at inference: it is built so that the
  pickle's keys load, and never called), one attention head, skip scale sqrt(1/2), GroupNorm with
  min(32, C/4) groups and eps 1e-6, 1x1 projection on resampling skips, additive (non-adaptive)
  conditioning; EDMPrecond with sigma_data 0.5;
* structure and keys (§2.4): the wrapper holds the UNet as ``model``, so ``state_dict()`` has exactly
  the pickle's key names -- ``model.map_augment.weight``, ``model.map_layer{0,1}.*``,
  ``model.enc.<r>x<r>_{conv,down,block<i>}.*``, ``model.dec.<r>x<r>_{in0,in1,up,block<i>,aux_norm,
  aux_conv}.*``, block children ``norm0, conv0, affine, norm1, conv1, skip, norm2, qkv, proj`` --
  and the persistent buffer ``resample_filter`` (1, 1, 2, 2) of each resampling convolution; no key
  map is needed;
* arithmetic (§2.5): the positional embedding is sin-first (EDM builds it cos-first and swaps the
  halves); ``qkv`` is one 1x1 convolution whose 3C output channels are interleaved (channel
  3c + j, j = q, k, v, per head); SiLU after each mapping layer;
* preconditioning (§2.3): D(x; sigma) = c_skip x + c_out F(c_in x; ln(sigma) / 4);
* size (§2.4): 55,733,891 parameters in 417 tensors, plus 8 ``resample_filter`` buffers
  (:attr:`EDMSongUNet.official_parameters`).

:meth:`EDMSongUNet.eps` is the contract of :class:`~.networks.EpsNetwork`: the VP state ``x_vp`` of
noise level sigma is scaled to EDM's state ``x = x_vp sqrt(1 + sigma^2)``, denoised, and
eps = (x - D(x; sigma)) / sigma.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from .networks import EpsNetwork, register_network

#: the paper-scale hyper-parameters (§2.2), overridable by ``from_config``
PAPER_CONFIG: dict[str, Any] = {
    "img_resolution": 32, "img_channels": 3, "model_channels": 128, "channel_mult": (2, 2, 2),
    "channel_mult_emb": 4, "num_blocks": 4, "attn_resolutions": (16,), "dropout": 0.13,
    "augment_dim": 9, "resample_filter": (1, 1), "sigma_data": 0.5,
}
#: the official options that select code paths: only the pickle's values are implemented
FIXED: dict[str, Any] = {
    "model_type": "SongUNet", "precond": "edm", "label_dim": 0, "embedding_type": "positional",
    "channel_mult_noise": 1, "encoder_type": "standard", "decoder_type": "standard", "use_fp16": False,
}


def _uniform(shape: tuple[int, ...], fan_in: int, fan_out: int, gain: float) -> torch.Tensor:
    """Xavier-uniform values times ``gain`` (EDM's DDPM++ initialisation)."""
    bound = gain * math.sqrt(6.0 / (fan_in + fan_out))
    return (torch.rand(shape) * 2.0 - 1.0) * bound


def positional_embedding(labels: torch.Tensor, channels: int, max_positions: float = 10000.0) -> torch.Tensor:
    """The sinusoidal noise embedding (B,) -> (B, channels): frequencies max_positions^(-k / (n - 1)),
    k = 0 .. n - 1, n = channels / 2 (endpoint included), sin half first, then cos.  The same as
    Score SDE's DDPM++ embedding of the same label (§5.4)."""
    half = channels // 2
    k = torch.arange(half, dtype=labels.dtype, device=labels.device)
    freqs = (1.0 / max_positions) ** (k / (half - 1))
    arg = labels.reshape(-1, 1) * freqs.reshape(1, -1)
    return torch.cat([arg.sin(), arg.cos()], dim=1)


class Linear(nn.Module):
    """``weight`` (out, in) and optional ``bias`` (out,)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, gain: float = 1.0):
        super().__init__()
        self.weight = nn.Parameter(_uniform((out_features, in_features), in_features, out_features, gain))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class Conv2d(nn.Module):
    """A ``kernel`` x ``kernel`` convolution (``kernel`` 0: none), after an optional 2x up- or
    down-sampling by the separable ``resample_filter`` (a persistent buffer (1, 1, n, n), the outer
    product of the filter normalised to sum 1; [1, 1] gives 0.25 everywhere): down = depthwise
    stride-2 convolution with it, up = depthwise stride-2 transposed convolution with 4x it."""

    def __init__(self, in_channels: int, out_channels: int, kernel: int, bias: bool = True, up: bool = False,
                 down: bool = False, resample_filter: tuple[int, ...] = (1, 1), gain: float = 1.0):
        super().__init__()
        if up and down:
            raise ValueError("a convolution resamples up or down, not both")
        self.in_channels, self.out_channels, self.up, self.down = in_channels, out_channels, up, down
        fan_in, fan_out = in_channels * kernel * kernel, out_channels * kernel * kernel
        self.weight = (nn.Parameter(_uniform((out_channels, in_channels, kernel, kernel), fan_in, fan_out, gain))
                       if kernel else None)
        self.bias = nn.Parameter(torch.zeros(out_channels)) if kernel and bias else None
        if up or down:
            f = torch.as_tensor([float(v) for v in resample_filter], dtype=torch.float32)
            self.register_buffer("resample_filter", (torch.outer(f, f) / f.sum() ** 2).reshape(1, 1, len(f), len(f)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.up or self.down:
            f = self.resample_filter.to(x.dtype)
            pad, c = (f.shape[-1] - 1) // 2, x.shape[1]
            if self.up:
                x = F.conv_transpose2d(x, (f * 4).tile(c, 1, 1, 1), groups=c, stride=2, padding=pad)
            else:
                x = F.conv2d(x, f.tile(c, 1, 1, 1), groups=c, stride=2, padding=pad)
        if self.weight is not None:
            x = F.conv2d(x, self.weight, padding=self.weight.shape[-1] // 2)
        if self.bias is not None:
            x = x + self.bias.reshape(1, -1, 1, 1)
        return x


class GroupNorm(nn.Module):
    """GroupNorm with min(32, C / 4) groups, ``weight`` and ``bias`` (C,)."""

    def __init__(self, num_channels: int, eps: float = 1e-6):
        super().__init__()
        self.num_groups, self.eps = min(32, num_channels // 4), eps
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)


class UNetBlock(nn.Module):
    """A DDPM++ residual block, optionally resampling, optionally followed by self-attention.

    h = conv0(SiLU(norm0(x))) (resampled if ``up``/``down``); h = SiLU(norm1(h + affine(emb)));
    h = conv1(dropout(h)); x = (h + skip(x)) * skip_scale, with ``skip`` a 1x1 convolution (resampled
    alike) when the channels change or the block resamples, else the identity.  With attention:
    x = (proj(attention(qkv(norm2(x)))) + x) * skip_scale, ``qkv`` giving per head the interleaved
    channels (3c + j, j = q, k, v) and softmax(q^T k / sqrt(C_head)) weighting v."""

    def __init__(self, in_channels: int, out_channels: int, emb_channels: int, up: bool = False,
                 down: bool = False, attention: bool = False, num_heads: int = 1, dropout: float = 0.0,
                 skip_scale: float = math.sqrt(0.5), eps: float = 1e-6, resample_filter: tuple[int, ...] = (1, 1)):
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.num_heads = num_heads if attention else 0
        self.dropout, self.skip_scale = dropout, skip_scale
        rs = dict(up=up, down=down, resample_filter=resample_filter)
        self.norm0 = GroupNorm(in_channels, eps)
        self.conv0 = Conv2d(in_channels, out_channels, 3, **rs)
        self.affine = Linear(emb_channels, out_channels)
        self.norm1 = GroupNorm(out_channels, eps)
        self.conv1 = Conv2d(out_channels, out_channels, 3, gain=1e-5)
        self.skip = Conv2d(in_channels, out_channels, 1, **rs) if in_channels != out_channels or up or down else None
        if self.num_heads:
            self.norm2 = GroupNorm(out_channels, eps)
            self.qkv = Conv2d(out_channels, 3 * out_channels, 1, gain=math.sqrt(0.2))
            self.proj = Conv2d(out_channels, out_channels, 1, gain=1e-5)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv0(F.silu(self.norm0(x)))
        h = F.silu(self.norm1(h + self.affine(emb).reshape(h.shape[0], -1, 1, 1)))
        h = self.conv1(F.dropout(h, p=self.dropout, training=self.training))
        x = (h + (self.skip(x) if self.skip is not None else x)) * self.skip_scale
        if self.num_heads:
            b, c, hh, ww = x.shape
            qkv = self.qkv(self.norm2(x)).reshape(b * self.num_heads, c // self.num_heads, 3, hh * ww)
            q, k, v = qkv.unbind(2)
            w = torch.einsum("ncq,nck->nqk", q, k / math.sqrt(k.shape[1])).softmax(dim=2)
            a = torch.einsum("nqk,nck->ncq", w, v).reshape(b, c, hh, ww)
            x = (self.proj(a) + x) * self.skip_scale
        return x


class SongUNet(nn.Module):
    """EDM's DDPM++ UNet ("standard" encoder and decoder, positional embedding, unconditional):
    ``forward(x, noise_labels)`` maps (B, C, H, W) and labels (B,) to (B, C, H, W)."""

    def __init__(self, img_resolution: int = 32, in_channels: int = 3, out_channels: int = 3, augment_dim: int = 9,
                 model_channels: int = 128, channel_mult: tuple[int, ...] = (2, 2, 2), channel_mult_emb: int = 4,
                 num_blocks: int = 4, attn_resolutions: tuple[int, ...] = (16,), dropout: float = 0.13,
                 resample_filter: tuple[int, ...] = (1, 1)):
        super().__init__()
        if img_resolution % 2 ** (len(channel_mult) - 1):
            raise ValueError(f"img_resolution {img_resolution} is not divisible by 2^{len(channel_mult) - 1}")
        self.noise_channels, emb = model_channels, model_channels * channel_mult_emb
        block = dict(emb_channels=emb, dropout=dropout, resample_filter=tuple(resample_filter))
        self.map_augment = Linear(augment_dim, model_channels, bias=False) if augment_dim else None
        self.map_layer0 = Linear(model_channels, emb)
        self.map_layer1 = Linear(emb, emb)

        self.enc = nn.ModuleDict()
        skips, cout = [], in_channels
        for level, mult in enumerate(channel_mult):
            r = img_resolution >> level
            if level == 0:
                cout = model_channels
                self.enc[f"{r}x{r}_conv"] = Conv2d(in_channels, cout, 3)
            else:
                self.enc[f"{r}x{r}_down"] = UNetBlock(cout, cout, down=True, **block)
            skips.append(cout)
            for i in range(num_blocks):
                cin, cout = cout, model_channels * mult
                self.enc[f"{r}x{r}_block{i}"] = UNetBlock(cin, cout, attention=r in attn_resolutions, **block)
                skips.append(cout)

        self.dec = nn.ModuleDict()
        self._concat: set[str] = set()  # the decoder blocks that take an encoder output
        for level, mult in reversed(list(enumerate(channel_mult))):
            r = img_resolution >> level
            if level == len(channel_mult) - 1:
                self.dec[f"{r}x{r}_in0"] = UNetBlock(cout, cout, attention=True, **block)
                self.dec[f"{r}x{r}_in1"] = UNetBlock(cout, cout, **block)
            else:
                self.dec[f"{r}x{r}_up"] = UNetBlock(cout, cout, up=True, **block)
            for i in range(num_blocks + 1):
                cin, cout = cout + skips.pop(), model_channels * mult
                attn = i == num_blocks and r in attn_resolutions
                self.dec[f"{r}x{r}_block{i}"] = UNetBlock(cin, cout, attention=attn, **block)
                self._concat.add(f"{r}x{r}_block{i}")
        assert not skips
        r = img_resolution
        self.dec[f"{r}x{r}_aux_norm"] = GroupNorm(cout)
        self.dec[f"{r}x{r}_aux_conv"] = Conv2d(cout, out_channels, 3, gain=1e-5)

    def forward(self, x: torch.Tensor, noise_labels: torch.Tensor) -> torch.Tensor:
        # map_augment is for augmentation labels at training time: not part of inference
        emb = positional_embedding(noise_labels, self.noise_channels)
        emb = F.silu(self.map_layer1(F.silu(self.map_layer0(emb))))
        skips = []
        for block in self.enc.values():
            x = block(x, emb) if isinstance(block, UNetBlock) else block(x)
            skips.append(x)
        for name, block in self.dec.items():
            if name.endswith("_aux_norm"):
                x = block(x)
            elif name.endswith("_aux_conv"):
                x = block(F.silu(x))
            else:
                if name in self._concat:
                    x = torch.cat([x, skips.pop()], dim=1)
                x = block(x, emb)
        return x


def _config(cfg: dict[str, Any] | None) -> dict[str, Any]:
    """:data:`PAPER_CONFIG` updated by ``cfg``; refuses unknown keys and other values of :data:`FIXED`."""
    cfg = dict(cfg or {})
    unknown = sorted(k for k in cfg if k not in PAPER_CONFIG and k not in FIXED)
    if unknown:
        raise ValueError(f"unknown EDM network option(s) {', '.join(unknown)}; known: "
                         f"{', '.join([*PAPER_CONFIG, *FIXED])}")
    for key, value in FIXED.items():
        if key in cfg and str(cfg[key]).lower() != str(value).lower():
            raise ValueError(f"EDM network option {key}={cfg[key]!r} is not implemented; only {value!r} "
                             "(the value of edm-cifar10-32x32-uncond-vp.pkl) is")
    out = {k: cfg.get(k, v) for k, v in PAPER_CONFIG.items()}
    for key in ("channel_mult", "attn_resolutions", "resample_filter"):
        out[key] = tuple(int(v) for v in out[key])
    return out


@register_network
class EDMSongUNet(EpsNetwork):
    """EDMPrecond around EDM's SongUNet, the EDM family's paper-scale network (module docstring).

    ``forward(x, sigma)`` is the official denoiser D(x; sigma) on EDM's state ``x`` ([-1, 1] data plus
    noise of std ``sigma``; ``sigma`` a float, a 0-d tensor or one value per sample).  The UNet runs
    in its parameters' dtype; the preconditioning in ``x``'s dtype.
    """

    name = "edm_songunet"
    family = "edm"
    #: ../shared/reference/paper-scale-networks.md §2.4 (derived from the EDM source)
    official_parameters: ClassVar[int | None] = 55_733_891

    def __init__(self, img_resolution: int = 32, img_channels: int = 3, sigma_data: float = 0.5, **unet: Any):
        super().__init__()
        self.img_resolution, self.img_channels, self.sigma_data = img_resolution, img_channels, float(sigma_data)
        self.model = SongUNet(img_resolution=img_resolution, in_channels=img_channels, out_channels=img_channels,
                              **unet)

    # -- construction and loading ------------------------------------------------------------
    @classmethod
    def from_config(cls, cfg: dict[str, Any] | None = None) -> "EDMSongUNet":
        """The network of :data:`PAPER_CONFIG` updated by ``cfg`` (e.g. ``{"img_resolution": 8,
        "model_channels": 8, "channel_mult": [1, 2], "num_blocks": 1, "attn_resolutions": [4]}`` for
        a small test instance), in eval mode (dropout off).  Unknown keys, and other values of the
        :data:`FIXED` options, are refused.  Builds on the default device, so
        ``with torch.device("meta"):`` gives a shape-only instance."""
        return cls(**_config(cfg)).eval()

    @classmethod
    def load_state(cls, path: str | Path, cfg: dict[str, Any] | None = None,
                   sha256: str | None = None, limits=None) -> "EDMSongUNet":
        """The network of ``cfg`` (:meth:`from_config`) with the EMA weights of EDM's pickle ``path``
        (checked against ``sha256`` first when given), in eval mode; ``limits``: the reader's
        :class:`.bounds.Limits` (default ones if None).

        The pickle is read by :func:`.edm_pickle.read_edm_pickle` (the stream as data, under
        resource bounds: inert records, plain containers and tensors decoded into memory the reader
        allocated; the persistence records' embedded source is hashed, never executed).  Its ``ema``
        entry must be an ``EDMPrecond`` record (the class name is read from the pickle, not from
        the file name: a ``VPPrecond`` is refused); its ``sigma_data``, ``label_dim`` (0),
        ``img_resolution`` and ``img_channels`` present, typed, finite and equal to this network's
        (:func:`.edm_pickle.check_precond_attrs`); the scalar hyper-parameters of its module records
        (``use_fp16``, ``sigma_min``/``sigma_max``, the noise embedding's, each block's ``skip_scale``, ...)
        typed, in range and equal to what this network computes with (:func:`.edm_attrs.check_module_attrs`); its parameters and persistent buffers, named by
        their path (``model.enc.16x16_block0.qkv.weight``, ...), must be exactly this network's
        parameters and buffers, each kind separately, with their shapes and dtypes (missing,
        unexpected, mis-shaped, mis-typed and shadowing keys are named;
        :func:`.verification.match_parts`) and are loaded strictly.
        """
        from .bounds import DEFAULT_LIMITS
        from .edm_attrs import check_module_attrs
        from .edm_pickle import check_precond_attrs, ema_parts, read_edm_pickle  # they import nothing of this module
        from .verification import match_parts, verify_file

        if sha256:
            verify_file(path, sha256)
        net = cls.from_config(cfg)
        data = read_edm_pickle(path, limits or DEFAULT_LIMITS)
        params, buffers, attrs = ema_parts(data, "EDMPrecond")
        check_precond_attrs(attrs, net.sigma_data, net.img_resolution, net.img_channels, path)
        check_module_attrs(data["ema"], net, path)
        match_parts(net, params, buffers, path)
        return net.eval()

    # -- the denoiser and the noise prediction -----------------------------------------------
    def _sigma(self, sigma: float | torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        if isinstance(sigma, torch.Tensor):
            s = sigma.to(device=x.device, dtype=x.dtype)
        else:  # a Python number: straight to x's dtype (no float32 rounding on the way)
            s = torch.tensor(float(sigma), dtype=x.dtype, device=x.device)
        if s.numel() == 1:
            s = s.reshape(1).expand(x.shape[0])
        if s.numel() != x.shape[0]:
            raise ValueError(f"sigma has {s.numel()} values for a batch of {x.shape[0]}")
        return s.reshape(-1, 1, 1, 1)

    def forward(self, x: torch.Tensor, sigma: float | torch.Tensor) -> torch.Tensor:
        """EDM's denoiser D(x; sigma) = c_skip x + c_out F(c_in x; ln(sigma) / 4) (§2.3)."""
        s = self._sigma(sigma, x)
        sd2 = self.sigma_data ** 2
        c_skip = sd2 / (s * s + sd2)
        c_out = s * self.sigma_data / (s * s + sd2).sqrt()
        c_in = 1.0 / (s * s + sd2).sqrt()
        c_noise = s.log().reshape(-1) / 4
        dtype = self.model.map_layer0.weight.dtype
        f = self.model((c_in * x).to(dtype), c_noise.to(dtype)).to(x.dtype)
        return c_skip * x + c_out * f

    @property
    def image_shape(self) -> tuple[int, int]:
        return self.img_channels, self.img_resolution

    def eps(self, x_vp: torch.Tensor, sigma: float | torch.Tensor) -> torch.Tensor:
        """The noise prediction at the VP state ``x_vp`` of EDM noise level ``sigma``:
        x = x_vp sqrt(1 + sigma^2), eps = (x - D(x; sigma)) / sigma.  Computed in the equal form
        (1 - c_skip) x / sigma - c_out F / sigma = sigma x / (sigma^2 + sigma_d^2)
        - sigma_d F / sqrt(sigma^2 + sigma_d^2), which has no cancellation at small sigma."""
        s = self._sigma(sigma, x_vp)
        x = x_vp * (1.0 + s * s).sqrt()
        sd2 = self.sigma_data ** 2
        norm = (s * s + sd2).sqrt()
        dtype = self.model.map_layer0.weight.dtype
        f = self.model((x / norm).to(dtype), (s.log().reshape(-1) / 4).to(dtype)).to(x.dtype)
        return s * x / (s * s + sd2) - self.sigma_data * f / norm
