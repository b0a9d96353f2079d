"""Score SDE's DDPM++ network, the epsilon network of DiffPure's VP-SDE rows (issue 18).

Which network.  "DDPM++ cont. (deep, VP)": Score SDE's ``ncsnpp`` model with the hyper-parameters of
``configs/vp/cifar10_ddpmpp_deep_continuous.py`` (on top of ``configs/default_cifar10_configs.py``),
whose ``checkpoint_8.pth`` (step 400,000) DiffPure purifies CIFAR-10 with.  Re-implemented here from
the description in ``../shared/reference/paper-scale-networks.md`` (§1; the section numbers below are
that page's); the Score SDE source (Apache-2.0) was only read for names, shapes and hyper-parameters.
No weights are shipped: the official file is fetched and pinned elsewhere and read by
:meth:`DDPMpp.load_state`.

The choices, and what each follows:

* hyper-parameters (§1.1, :data:`PAPER_CONFIG`): nf 128, ch_mult (1, 2, 2, 2), 8 residual blocks per
  level, attention at 16x16, dropout 0.1, BigGAN-style residual blocks with 2x2 average-pool /
  nearest resampling (fir False), skip_rescale (sums divided by sqrt 2), positional time embedding,
  GroupNorm (min(C/4, 32) groups, eps 1e-6), SiLU, no progressive paths, scale_by_sigma False,
  centered data ([-1, 1] input); the options that only select code paths the checkpoint does not use
  are fixed (:data:`FIXED`) and refused with another value;
* structure and keys (§1.2): one flat ``all_modules`` ``ModuleList`` of 91 modules in the official
  order (time MLP 0-1, input conv 2, encoder 3-45, middle 46-48, decoder 49-88, GroupNorm 89, output
  conv 90) plus the float64 buffer ``sigmas`` (1000 values, 50 down to 0.01; unused by the forward
  pass, kept because the checkpoint has it), so ``state_dict()`` has exactly the checkpoint's keys
  without its DataParallel ``module.`` prefix -- no key map;
* conditioning (§1.3): the label 999 t (continuous float) through a 128-wide sinusoidal embedding
  (sin half first), Linear 128->512, SiLU, Linear 512->512; each residual block adds
  Dense_0(SiLU(temb)) after its first convolution;
* output (§1.3): the network output is the noise estimate eps (the continuous loss is
  ||score * std + z||^2 with score = -output / std, so the output regresses z), and DiffPure's score
  is -eps / std(t);
* weights (§1.4): the EMA shadow parameters, as DiffPure uses them (see :meth:`DDPMpp.load_state`);
* size (§1.5): 106,632,579 parameters in 956 tensors (:attr:`DDPMpp.official_parameters`).

:meth:`DDPMpp.eps` is the contract of :class:`~.networks.EpsNetwork`: the EDM noise level sigma of the
VP state is mapped to the continuous VP time t of the same noise level (:func:`vp_time`) and the
network is called at 999 t.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from .ddpmpp_layers import AttnBlock, ResBlock, conv, group_norm, linear, positional_embedding
from .networks import EpsNetwork, register_network
from .bounds import CheckpointError, summary

#: the paper-scale hyper-parameters (``vp/cifar10_ddpmpp_deep_continuous``), overridable by ``from_config``
PAPER_CONFIG: dict[str, Any] = {
    "nf": 128, "ch_mult": (1, 2, 2, 2), "num_res_blocks": 8, "attn_resolutions": (16,), "dropout": 0.1,
    "image_size": 32, "num_channels": 3, "skip_rescale": True, "init_scale": 0.0,
    "beta_min": 0.1, "beta_max": 20.0, "sigma_min": 0.01, "sigma_max": 50.0, "num_scales": 1000,
}
#: the official options that select code paths: only the checkpoint's values are implemented (a
#: tuple lists the accepted spellings: the model is "ncsnpp" in Score SDE, "ddpmpp" in our registry)
FIXED: dict[str, Any] = {
    "name": ("ncsnpp", "ddpmpp"), "resblock_type": "biggan", "embedding_type": "positional", "attention_type": "ddpm",
    "progressive": "none", "progressive_input": "none", "progressive_combine": "sum", "conditional": True,
    "fir": False, "resamp_with_conv": True, "scale_by_sigma": False, "centered": True, "nonlinearity": "swish",
    "normalization": "GroupNorm", "conv_size": 3, "continuous": True,
}
#: options of the official config that this architecture does not read (accepted and ignored)
UNUSED = ("fir_kernel", "fourier_scale", "ema_rate")


def vp_time(sigma: float | torch.Tensor, beta_min: float = 0.1, beta_max: float = 20.0) -> torch.Tensor:
    """The continuous VP time t of EDM noise level ``sigma``: the root t >= 0 of
    ``sigma^2 = exp(t^2 (beta_max - beta_min) / 2 + t beta_min) - 1`` (Score SDE's VP SDE, whose
    alpha_bar(t) = exp(-t^2 (beta_max - beta_min) / 2 - t beta_min) = 1 / (1 + sigma^2)).  A float
    gives a float64 tensor; a tensor keeps its dtype (and its autograd graph)."""
    s = sigma if isinstance(sigma, torch.Tensor) else torch.tensor(float(sigma), dtype=torch.float64)
    if not s.is_floating_point():
        s = s.double()
    d = beta_max - beta_min
    return (torch.sqrt(beta_min ** 2 + 2.0 * d * torch.log1p(s * s)) - beta_min) / d


def vp_sigma(t: float | torch.Tensor, beta_min: float = 0.1, beta_max: float = 20.0) -> torch.Tensor:
    """The EDM noise level of continuous VP time ``t`` (the inverse of :func:`vp_time`)."""
    tt = t if isinstance(t, torch.Tensor) else torch.tensor(float(t), dtype=torch.float64)
    return torch.sqrt(torch.expm1(0.5 * (beta_max - beta_min) * tt * tt + beta_min * tt))


def _config(cfg: dict[str, Any] | None) -> dict[str, Any]:
    """:data:`PAPER_CONFIG` updated by ``cfg``; refuses unknown keys and other values of :data:`FIXED`."""
    cfg = dict(cfg or {})
    unknown = sorted(k for k in cfg if k not in PAPER_CONFIG and k not in FIXED and k not in UNUSED)
    if unknown:
        raise ValueError(f"unknown DDPM++ option(s) {', '.join(unknown)}; known: "
                         f"{', '.join([*PAPER_CONFIG, *FIXED, *UNUSED])}")
    for key, value in FIXED.items():
        accepted = value if isinstance(value, tuple) else (value,)
        if key in cfg and str(cfg[key]).lower() not in {str(v).lower() for v in accepted}:
            raise ValueError(f"DDPM++ option {key}={cfg[key]!r} is not implemented; only "
                             f"{' or '.join(map(repr, accepted))} (as in vp/cifar10_ddpmpp_deep_continuous)")
    out = {k: cfg.get(k, v) for k, v in PAPER_CONFIG.items()}
    out["ch_mult"] = tuple(int(m) for m in out["ch_mult"])
    out["attn_resolutions"] = tuple(int(r) for r in out["attn_resolutions"])
    return out


@register_network
class DDPMpp(EpsNetwork):
    """Score SDE's DDPM++ (``ncsnpp``), the VP-SDE family's paper-scale network (module docstring).

    ``forward(x, labels)`` is the official network: ``x`` (B, C, H, W) in [-1, 1] units (the VP state),
    ``labels`` (B,) the time labels 999 t; it returns eps (B, C, H, W).  ``eps(x_vp, sigma)`` calls it
    at the label of EDM noise level ``sigma``.
    """

    name = "ddpmpp"
    family = "vpsde"
    #: ../shared/reference/paper-scale-networks.md §1.5 (derived from the Score SDE source)
    official_parameters: ClassVar[int | None] = 106_632_579

    def __init__(self, nf: int = 128, ch_mult: tuple[int, ...] = (1, 2, 2, 2), num_res_blocks: int = 8,
                 attn_resolutions: tuple[int, ...] = (16,), dropout: float = 0.1, image_size: int = 32,
                 num_channels: int = 3, skip_rescale: bool = True, init_scale: float = 0.0,
                 beta_min: float = 0.1, beta_max: float = 20.0, sigma_min: float = 0.01,
                 sigma_max: float = 50.0, num_scales: int = 1000):
        super().__init__()
        if image_size % 2 ** (len(ch_mult) - 1):
            raise ValueError(f"image_size {image_size} is not divisible by 2^{len(ch_mult) - 1} (ch_mult {ch_mult})")
        self.nf, self.ch_mult, self.num_res_blocks = nf, tuple(ch_mult), num_res_blocks
        self.attn_resolutions, self.image_size, self.num_channels = tuple(attn_resolutions), image_size, num_channels
        self.beta_min, self.beta_max = float(beta_min), float(beta_max)
        # the noise levels of Score SDE's SMLD configs: part of the checkpoint, not of the computation
        sig = np.exp(np.linspace(np.log(sigma_max), np.log(sigma_min), num_scales))
        self.register_buffer("sigmas", torch.tensor(sig, dtype=torch.float64))
        self.act = nn.SiLU()  # no parameters: no state-dict entry (as in the official module)

        block = partial(ResBlock, temb_dim=4 * nf, dropout=dropout, skip_rescale=skip_rescale, init_scale=init_scale)
        attn = partial(AttnBlock, skip_rescale=skip_rescale, init_scale=init_scale)
        modules: list[nn.Module] = [linear(nf, 4 * nf), linear(4 * nf, 4 * nf), conv(num_channels, nf, 3)]
        skips, ch = [nf], nf  # channels of the encoder outputs the decoder concatenates
        for level, mult in enumerate(self.ch_mult):
            for _ in range(num_res_blocks):
                modules.append(block(ch, nf * mult))
                ch = nf * mult
                if self._resolution(level) in self.attn_resolutions:
                    modules.append(attn(ch))
                skips.append(ch)
            if level != len(self.ch_mult) - 1:
                modules.append(block(ch, down=True))
                skips.append(ch)
        modules += [block(ch), attn(ch), block(ch)]
        for level in reversed(range(len(self.ch_mult))):
            for _ in range(num_res_blocks + 1):
                modules.append(block(ch + skips.pop(), nf * self.ch_mult[level]))
                ch = nf * self.ch_mult[level]
            if self._resolution(level) in self.attn_resolutions:
                modules.append(attn(ch))
            if level != 0:
                modules.append(block(ch, up=True))
        assert not skips
        modules += [group_norm(ch), conv(ch, num_channels, 3, init_scale=init_scale)]
        self.all_modules = nn.ModuleList(modules)

    def _resolution(self, level: int) -> int:
        return self.image_size // 2 ** level

    # -- construction and loading ------------------------------------------------------------
    @classmethod
    def from_config(cls, cfg: dict[str, Any] | None = None) -> "DDPMpp":
        """The network of :data:`PAPER_CONFIG` updated by ``cfg`` (e.g. ``{"nf": 16,
        "num_res_blocks": 1, "image_size": 16}`` for a small test instance), in eval mode and with
        DDPM's initialisation.  Unknown keys, and other values of the :data:`FIXED` options, are
        refused.  Builds on the default device, so ``with torch.device("meta"):`` gives a
        shape-only instance."""
        return cls(**_config(cfg)).eval()

    @classmethod
    def load_state(cls, path: str | Path, cfg: dict[str, Any] | None = None, use_ema: bool = True,
                   sha256: str | None = None, limits=None) -> "DDPMpp":
        """The network of ``cfg`` (:meth:`from_config`) with the weights of Score SDE's checkpoint
        file ``path``, in eval mode.

        The file (§1.4) is a ``torch.save`` of ``{"model", "ema", "optimizer", "step"}``; it is
        bounded first (:func:`.torch_guard.guard_torch_file`: size, zip records, the pickle's
        structure) and read with ``torch.load(map_location="cpu", weights_only=True)`` only (tensors
        and plain containers; anything else is refused, never executed).  ``model`` is the DataParallel state
        dict of the raw (non-EMA) weights, keys ``module.<name>``; ``ema["shadow_params"]`` is a list
        with one tensor per parameter, in ``model.parameters()`` order (Score SDE's EMA keeps the
        parameters that require grad: all of them here).  DiffPure copies that list onto its model's
        ``parameters()`` by position (``ema.copy_to``).  So here: ``module.`` is stripped from the
        ``model`` keys, which must be exactly this network's state-dict keys (missing and unexpected
        ones are named); the buffers (``sigmas``) come from ``model``; the i-th shadow tensor
        replaces the i-th entry of ``named_parameters()`` -- after checking that the parameter keys
        of ``model`` come in that same order, that the list has one tensor per parameter and that
        every shape and dtype matches -- and the result is loaded with ``strict=True``.  ``use_ema=False``
        loads the raw ``model`` weights instead.  ``sha256``: the file is checked against it first;
        ``limits``: the guard's :class:`.bounds.Limits` (default ones if None).
        """
        if sha256:
            from .verification import verify_file

            verify_file(path, sha256)
        ckpt = _read_checkpoint(Path(path), limits)
        net = cls.from_config(cfg)
        state = _strip_module(ckpt["model"], path)
        own = net.state_dict()
        missing = [k for k in own if k not in state]
        unexpected = [k for k in state if k not in own]
        if missing or unexpected:
            parts = [_listed(kind, keys) for kind, keys in (("missing", missing), ("unexpected", unexpected)) if keys]
            raise CheckpointError(f"{path}: the 'model' keys do not fit DDPM++ {_describe(net)}: " + "; ".join(parts))
        wrong = [f"{k} is {tuple(v.shape)} in the checkpoint, {tuple(own[k].shape)} in the network"
                 for k, v in state.items() if tuple(v.shape) != tuple(own[k].shape)]
        if wrong:
            raise CheckpointError(f"{path}: shape mismatch: " + "; ".join(wrong[:10]))
        _check_dtypes(((k, v, own[k]) for k, v in state.items()), path)
        if use_ema:
            names = [n for n, _ in net.named_parameters()]
            shadow, is_param = _shadow_params(ckpt, path), set(names).__contains__
            if list(filter(is_param, state)) != names:
                raise CheckpointError(f"{path}: the parameters of 'model' are not in the network's parameter "
                                      "order, so the EMA list cannot be mapped onto them by position")
            if len(shadow) != len(names):
                raise CheckpointError(f"{path}: ema['shadow_params'] has {len(shadow)} tensors, the network "
                                      f"{_describe(net)} has {len(names)} parameters")
            for i, (name, tensor) in enumerate(zip(names, shadow)):
                if tuple(tensor.shape) != tuple(own[name].shape):
                    raise CheckpointError(f"{path}: ema['shadow_params'][{i}] has shape {tuple(tensor.shape)}, "
                                          f"but the parameter at that position, {name}, is {tuple(own[name].shape)}")
                _check_dtypes([(f"ema['shadow_params'][{i}] ({name})", tensor, own[name])], path)
                state[name] = tensor
        net.load_state_dict(state, strict=True)
        return net.eval()

    # -- the network -------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """eps at the VP state ``x`` (B, C, H, W; [-1, 1] units) and time labels (B,) = 999 t."""
        if x.ndim != 4 or tuple(x.shape[1:]) != (self.num_channels, self.image_size, self.image_size):
            raise ValueError(f"DDPM++ (image_size {self.image_size}) expects (B, {self.num_channels}, "
                             f"{self.image_size}, {self.image_size}), got {tuple(x.shape)}")
        mods = iter(self.all_modules)
        temb = positional_embedding(labels.to(x.dtype), self.nf)
        temb = next(mods)(temb)
        temb = next(mods)(self.act(temb))

        hs = [next(mods)(x)]
        for level in range(len(self.ch_mult)):
            for _ in range(self.num_res_blocks):
                h = next(mods)(hs[-1], temb)
                if self._resolution(level) in self.attn_resolutions:
                    h = next(mods)(h)
                hs.append(h)
            if level != len(self.ch_mult) - 1:
                hs.append(next(mods)(hs[-1], temb))

        h = next(mods)(hs[-1], temb)
        h = next(mods)(h)
        h = next(mods)(h, temb)

        for level in reversed(range(len(self.ch_mult))):
            for _ in range(self.num_res_blocks + 1):
                h = next(mods)(torch.cat([h, hs.pop()], dim=1), temb)
            if self._resolution(level) in self.attn_resolutions:
                h = next(mods)(h)
            if level != 0:
                h = next(mods)(h, temb)

        norm, out = next(mods), next(mods)
        assert next(mods, None) is None and not hs, "DDPM++: every module and skip is used once"
        return out(self.act(norm(h)))

    @property
    def image_shape(self) -> tuple[int, int]:
        return self.num_channels, self.image_size

    def eps(self, x_vp: torch.Tensor, sigma: float | torch.Tensor) -> torch.Tensor:
        """The noise prediction at the VP state ``x_vp`` of EDM noise level ``sigma`` (a float or one
        value per sample): the network at label 999 t, t = :func:`vp_time` (sigma) (Score SDE's
        continuous VP convention, with its beta_min, beta_max).  DiffPure's t in [1e-5, 1] is sigma
        in about [0.001, 152.2]; other levels are extrapolations of the network."""
        t = vp_time(sigma, self.beta_min, self.beta_max)
        labels = (999.0 * t).to(device=x_vp.device, dtype=x_vp.dtype).reshape(-1)
        if labels.numel() == 1:
            labels = labels.expand(x_vp.shape[0])
        elif labels.numel() != x_vp.shape[0]:
            raise ValueError(f"sigma has {labels.numel()} values for a batch of {x_vp.shape[0]}")
        return self(x_vp, labels)


def _listed(kind: str, keys: list[str], limit: int = 10) -> str:
    more = f" (+{len(keys) - limit} more)" if len(keys) > limit else ""
    return f"{kind} {', '.join(keys[:limit])}{more}"


def _describe(net: DDPMpp) -> str:
    return (f"(nf {net.nf}, ch_mult {net.ch_mult}, num_res_blocks {net.num_res_blocks}, "
            f"image_size {net.image_size}; {len(net.all_modules)} modules)")


def _read_checkpoint(path: Path, limits=None) -> dict:
    """Score SDE's checkpoint dict: the file checked by :func:`.torch_guard.guard_torch_file` (size, zip records
    and their declared sizes -- no zip bomb --, ``data.pkl`` by the safe reader: depth, object count, torch's
    tensor globals only), then read with ``torch.load(weights_only=True)`` (never executing code)."""
    from .bounds import DEFAULT_LIMITS
    from .torch_guard import guard_torch_file

    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint file is missing")
    guard_torch_file(path, limits or DEFAULT_LIMITS)  # CheckpointError subclasses naming the opcode, global, record, bound
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a code payload, a corrupt or foreign file: all refused, nothing executed
        detail = " ".join(str(e).split())[:300] or type(e).__name__
        raise CheckpointError(f"{path}: not a weights-only PyTorch checkpoint (refused, nothing executed): {detail}") from None
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("model"), dict):
        found = sorted(summary(k) for k in ckpt)[:10] if isinstance(ckpt, dict) else summary(ckpt)
        raise CheckpointError(f"{path}: not a Score SDE checkpoint (a dict with 'model', 'ema', "
                              f"'optimizer', 'step'); found {found}")
    return ckpt


def _check_dtypes(items, path) -> None:
    """The first tensor whose dtype differs from the network's is named (load_state_dict would convert it)."""
    for name, tensor, mine in items:
        if tensor.dtype != mine.dtype:
            raise CheckpointError(f"{path}: {name} is {tensor.dtype} in the checkpoint, {mine.dtype} in the network")


def _strip_module(model: dict, path: str | Path) -> dict[str, torch.Tensor]:
    """The 'model' state dict without DataParallel's ``module.`` prefix, in its order."""
    out: dict[str, torch.Tensor] = {}
    for key, value in model.items():
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(f"{path}: model[{summary(key)}] is a {type(value).__name__}, not a tensor")
        if type(key) is not str:
            raise CheckpointError(f"{path}: model key {summary(key)} is not a string")
        name = key[len("module."):] if key.startswith("module.") else key
        if name in out:
            raise CheckpointError(f"{path}: {summary(name)} appears twice once 'module.' is removed")
        out[name] = value
    return out


def _shadow_params(ckpt: dict, path: str | Path) -> list[torch.Tensor]:
    ema = ckpt.get("ema")
    shadow = ema.get("shadow_params") if isinstance(ema, dict) else None
    if not isinstance(shadow, (list, tuple)) or not all(isinstance(s, torch.Tensor) for s in shadow):
        raise CheckpointError(f"{path}: no EMA weights: expected ema['shadow_params'], a list of tensors "
                              "(pass use_ema=False to load the raw 'model' weights)")
    return list(shadow)


__all__ = ["DDPMpp", "FIXED", "PAPER_CONFIG", "vp_sigma", "vp_time"]
