"""Checking third-party files before use, and loading weights without trusting them.

:func:`verify_file` checks a file against its pinned sha256 (and refuses HTML pages and Git LFS
pointers saved under a checkpoint's name); :func:`check_plausible` is what can be checked of an
unpinned file.  Weights are read as ``safetensors`` or through ``torch.load(weights_only=True)``
only (:func:`load_state_dict`): a pickle that carries code is refused, never executed.
:func:`load_weights_into` loads strictly and explains any mismatch.  Fetching the files is
:mod:`dbprepro.models.checkpoints`.
"""

from __future__ import annotations

import pickle
import re
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from ..io import sha256_file
from .bounds import DEFAULT_LIMITS, CheckpointError, summary

_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_HTML_STARTS = (b"<!doctype html", b"<html")
_LFS_POINTER = b"version https://git-lfs.github.com/spec/"
_PICKLE_SUFFIXES = (".pt", ".pth", ".t7", ".bin", ".pt.tar", ".pth.tar")
_CONTAINER_KEYS = ("state_dict", "model_state_dict", "model", "net")


def _expected_sha256(sha256: str, what: str | Path) -> str:
    value = str(sha256).strip().lower()
    if not _SHA256.match(value):
        raise CheckpointError(f"{what}: the pinned sha256 {sha256!r} is not 64 hex digits")
    return value


def _sniff(head: bytes) -> str | None:
    """What the first bytes say the file is, when it is clearly not a weights/data file."""
    text = head.lstrip(b"\xef\xbb\xbf").lstrip().lower()
    if text.startswith(_HTML_STARTS):
        return "an HTML page"
    if head.startswith(_LFS_POINTER):
        return "a Git LFS pointer file"
    return None


def verify_file(path: str | Path, sha256: str) -> Path:
    """Check that ``path`` is the pinned file; return it, else raise :class:`CheckpointError`.

    Refuses a missing or empty file, an HTML page (e.g. a Google Drive quota/virus-scan
    page saved under the checkpoint's name), a Git LFS pointer, and any sha256 mismatch
    (which also catches truncated downloads).  Never modifies or deletes the file.
    """
    path = Path(path)
    expected = _expected_sha256(sha256, path)
    if not path.is_file():
        raise CheckpointError(f"{path}: file is missing (expected sha256 {expected})")
    size = path.stat().st_size
    if size == 0:
        raise CheckpointError(f"{path}: file is empty, 0 bytes (expected sha256 {expected})")
    with open(path, "rb") as f:
        head = f.read(1024)
    kind = _sniff(head)
    if kind is not None:
        start = head.lstrip()[:60].decode("utf-8", "replace")
        raise CheckpointError(
            f"{path}: found {kind} ({size} bytes, starting {start!r}), not the expected file "
            f"with sha256 {expected}; the download was redirected or refused. Delete it and "
            "download again, or place the real file there by hand")
    actual = sha256_file(path)
    if actual != expected:
        raise CheckpointError(
            f"{path}: sha256 mismatch: expected {expected}, found {actual} ({size} bytes); "
            "the file is truncated, corrupted or a different version")
    return path


def check_plausible(path: str | Path) -> str:
    """What can be checked without a pinned hash: the file exists, is not empty, is not an HTML
    page or a Git LFS pointer.  Returns its sha256 (to be recorded and pinned)."""
    path = Path(path)
    if not path.is_file() or path.stat().st_size == 0:
        raise CheckpointError(f"{path}: file is missing or empty")
    with open(path, "rb") as f:
        kind = _sniff(f.read(1024))
    if kind is not None:
        raise CheckpointError(f"{path}: found {kind}, not the expected file; the download was redirected or refused")
    return sha256_file(path)


def _refusal(path: Path, err: Exception) -> CheckpointError:
    msg = str(err)
    found = sorted(set(re.findall(r"GLOBAL ([\w.]+)", msg)))
    if found:
        return CheckpointError(
            f"{path}: refused: the pickle references code or objects outside torch's "
            f"weights-only allowlist ({', '.join(found)}); it was not executed. If you trust "
            "the file, convert it to .safetensors yourself and load that instead")
    detail = msg.split("WeightsUnpickler error:", 1)[-1].split("Check the documentation", 1)[0]
    detail = " ".join(detail.split())[:300] or type(err).__name__
    return CheckpointError(f"{path}: not a readable PyTorch checkpoint (corrupt, not a torch "
                           f"file, or outside the weights-only format; nothing executed): {detail}")


def _unwrap(obj, path: Path) -> dict[str, torch.Tensor]:
    for _ in range(3):  # {"state_dict": {...}}, {"model": {"state_dict": ...}}, ...
        if not isinstance(obj, Mapping):
            break
        if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            break
        inner = next((obj[k] for k in _CONTAINER_KEYS
                      if k in obj and isinstance(obj[k], Mapping)), None)
        if inner is None:
            break
        obj = inner
    if not isinstance(obj, Mapping) or not obj:
        raise CheckpointError(f"{path}: no state dict inside (got {type(obj).__name__}; "
                              f"looked under {', '.join(_CONTAINER_KEYS)})")
    bad = [summary(k) for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"{path}: state dict has non-tensor entries: {', '.join(bad[:10])}")
    out: dict[str, torch.Tensor] = {}
    for key, value in obj.items():
        if type(key) is not str:
            raise CheckpointError(f"{path}: state dict key {summary(key)} is not a string")
        new = key[len("module."):] if key.startswith("module.") else key
        if new in out:
            raise CheckpointError(f"{path}: both {summary(key)} and {summary(new)} present after removing 'module.'")
        out[new] = value
    return out


def load_state_dict(path: str | Path, limits=None) -> dict[str, torch.Tensor]:
    """Read a state dict from ``.safetensors`` or a torch file (``.pt/.pth/.t7/.bin``).

    Torch files are checked by :func:`.torch_guard.guard_torch_file` (size, format by torch's
    rule, zip layout and records, the pickle's structure: a bounded load) and then go through ``torch.load(...,
    map_location="cpu", weights_only=True)`` only; anything needing other globals (a code
    payload) is refused with a :class:`CheckpointError`.  ``limits``: the guard's
    :class:`.bounds.Limits` (default ones if None).  Common containers (``{"state_dict": ...}``,
    ``{"model": ...}``, ``{"net": ...}``) are unwrapped and a ``module.`` prefix
    (DataParallel) is removed.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint file is missing")
    with open(path, "rb") as f:
        head = f.read(1024)
    if not head:
        raise CheckpointError(f"{path}: checkpoint file is empty")
    kind = _sniff(head)
    if kind is not None:
        raise CheckpointError(f"{path}: is {kind}, not a checkpoint; download it again")
    name = path.name.lower()
    if name.endswith(".safetensors"):
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return _unwrap(load_file(str(path), device="cpu"), path)
        except SafetensorError as e:
            raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from e
    if not name.endswith(_PICKLE_SUFFIXES):
        raise CheckpointError(f"{path}: unknown checkpoint type; expected .safetensors or "
                              f"one of {', '.join(_PICKLE_SUFFIXES)}")
    from .torch_guard import guard_torch_file

    guard_torch_file(path, limits or DEFAULT_LIMITS)  # bounded before torch reads it (size, zip, data.pkl)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, TypeError,
            AttributeError, KeyError, IndexError) as e:
        raise _refusal(path, e) from None
    return _unwrap(obj, path)


def _fmt(shape) -> str:
    return "(" + ", ".join(str(int(s)) for s in shape) + ")"


def load_weights_into(model: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> nn.Module:
    """Strictly load ``state_dict`` into ``model``; explain any mismatch in a CheckpointError.

    Missing BatchNorm ``num_batches_tracked`` counters (checkpoints from old PyTorch) are
    filled from the model; they do not affect evaluation.  Anything else missing,
    unexpected or of the wrong shape is an error naming the parameters and shapes.
    """
    own = model.state_dict()
    sd = dict(state_dict)
    for key in own:
        if key.endswith("num_batches_tracked") and key not in sd:
            sd[key] = own[key]
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    wrong = [(k, tuple(sd[k].shape), tuple(own[k].shape))
             for k in own if k in sd and tuple(sd[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or wrong:
        parts = []
        if wrong:
            parts.append("shape mismatch: " + "; ".join(
                f"{k} is {_fmt(s)} in the checkpoint, {_fmt(m)} in the model" for k, s, m in wrong[:10]))
        if missing:
            parts.append("missing from the checkpoint: " + ", ".join(
                f"{k} {_fmt(own[k].shape)}" for k in missing[:10]))
        if unexpected:
            parts.append("not in the model: " + ", ".join(
                f"{k} {_fmt(sd[k].shape)}" for k in unexpected[:10]))
        counts = f"({len(wrong)} wrong shapes, {len(missing)} missing, {len(unexpected)} unexpected)"
        raise CheckpointError(f"checkpoint does not fit {type(model).__name__} {counts} - "
                              "wrong architecture or settings? " + " | ".join(parts))
    model.load_state_dict(sd, strict=True)
    return model


def match_parts(model: nn.Module, params: Mapping[str, torch.Tensor], buffers: Mapping[str, torch.Tensor],
                where: str | Path = "checkpoint") -> nn.Module:
    """Load a checkpoint's ``params`` and persistent ``buffers`` into ``model``, matched separately against
    its parameters and buffers: a name under the other kind (or under both), or a dtype that differs from
    the model's, is refused naming the first such tensor; then :func:`load_weights_into` (names, shapes)."""
    own_p = dict(model.named_parameters())
    own_b = {k: v for k, v in model.state_dict().items() if k not in own_p}
    for key in params:
        if key in buffers:
            raise CheckpointError(f"{where}: {key} is both a parameter and a buffer (shadowing)")
    for mine, other, kind, other_kind in ((params, own_b, "parameter", "buffer"), (buffers, own_p, "buffer",
                                                                                     "parameter")):
        for key in mine:
            if key in other:
                raise CheckpointError(f"{where}: {key} is a {kind} in the checkpoint but a {other_kind} of "
                                      f"{type(model).__name__}")
    own = {**own_p, **own_b}
    for key, value in {**params, **buffers}.items():
        if key in own and value.dtype != own[key].dtype:
            raise CheckpointError(f"{where}: {key} is {value.dtype} in the checkpoint, {own[key].dtype} in the "
                                  "model")
    return load_weights_into(model, {**params, **buffers})
