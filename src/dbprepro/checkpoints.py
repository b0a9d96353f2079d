"""Fetch, verify and load third-party files (weights, data) without trusting them.

Every file that enters the pipeline from outside is pinned by a sha256 and checked with
:func:`verify_file` before use; Hugging Face downloads are pinned to a commit as well.
A file that is already present and verifies is never fetched again, so a re-run works
offline.  Weights are read as ``safetensors`` or through ``torch.load(weights_only=True)``
only: a pickle that carries code is refused, never executed.
"""

from __future__ import annotations

import logging
import os
import pickle
import re
import shutil
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from .io import sha256_file

try:  # imported at module level so tests can monkeypatch ``checkpoints.hf_hub_download``
    from huggingface_hub import hf_hub_download
except ImportError:  # pragma: no cover - huggingface_hub is a declared dependency
    hf_hub_download = None

log = logging.getLogger(__name__)

_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_COMMIT = re.compile(r"^[0-9a-f]{40}$")
_HTML_STARTS = (b"<!doctype html", b"<html")
_LFS_POINTER = b"version https://git-lfs.github.com/spec/"
_PICKLE_SUFFIXES = (".pt", ".pth", ".t7", ".bin", ".pt.tar", ".pth.tar")
_CONTAINER_KEYS = ("state_dict", "model_state_dict", "model", "net")


class CheckpointError(ValueError):
    """A checkpoint or data file is missing, not what was pinned, unsafe, or does not fit."""


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


def _check_relative(name: str) -> None:
    p = Path(name)
    if p.is_absolute() or ".." in p.parts or not p.parts:
        raise CheckpointError(f"{name!r}: file names must be relative paths inside the repository")


UNPINNED_RECORD = "dbprepro_unpinned.json"


def _read_record(folder: Path) -> dict:
    import json

    path = folder / UNPINNED_RECORD
    return json.loads(path.read_text()) if path.is_file() else {}


def _write_record(folder: Path, record: dict) -> None:
    import json

    record = dict(record, note="trust on first use: these values were NOT checked against a pin in the config; "
                                "copy them into the config and set allow_unpinned: false")
    from .io import write_text

    write_text(folder / UNPINNED_RECORD, json.dumps(record, indent=2, sort_keys=True) + "\n")


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


def _warn_unpinned(what: str, key: str, value: str) -> None:
    log.warning("UNPINNED %s: accepted on first use WITHOUT a pinned hash; pin it in the config: %s: %s",
                what, key, value)


def _resolve_revision(repo_id: str, repo_type: str) -> str:
    """The current commit of the default branch (trust on first use of an unpinned revision)."""
    try:
        from huggingface_hub import HfApi

        sha = HfApi().repo_info(repo_id, repo_type=repo_type).sha
    except Exception as e:
        raise CheckpointError(f"{repo_id}: revision not pinned and the current commit could not be "
                              f"resolved ({e}); pin the revision in the config") from e
    if not sha or not _COMMIT.match(str(sha)):
        raise CheckpointError(f"{repo_id}: the hub returned no commit id ({sha!r}); pin the revision in the config")
    return str(sha)


def download_hf(repo_id: str, revision: str | None, files: dict[str, str | None], dest_dir: str | Path,
                repo_type: str = "model", allow_unpinned: bool = False) -> dict[str, Path]:
    """Fetch ``files`` (repo-relative name -> sha256) of a Hugging Face repo into ``dest_dir``.

    ``revision`` must be a full 40-hex commit id (a branch or tag can move).  Each file
    lands at ``dest_dir / name`` (``hf_hub_download(..., local_dir=dest_dir)``) and is
    verified.  A file already present is verified and not fetched again (offline re-runs);
    if it does not verify, it is left untouched (it may have been placed by hand) and the
    error is raised.  A freshly downloaded file that fails verification is removed.
    Returns ``{name: local path}``.

    A ``revision`` or sha256 of ``None`` is refused unless ``allow_unpinned`` (trust on first
    use): the revision is then resolved to the default branch's current commit, an unpinned
    file is only checked by :func:`check_plausible`, and both are written to
    ``dest_dir/dbprepro_unpinned.json`` and logged as warnings; later runs verify the files
    against that record (so a changed file is still caught).
    """
    dest_dir = Path(dest_dir)
    record = _read_record(dest_dir) if allow_unpinned else {}
    unpinned = [n for n, sha in files.items() if sha is None]
    if (revision is None or unpinned) and not allow_unpinned:
        what = "revision" if revision is None else f"sha256 of {', '.join(unpinned)}"
        raise CheckpointError(f"{repo_id}: {what} not pinned (null) and allow_unpinned is false; an "
                              "unverified file is never accepted silently")
    if revision is None:
        rev = record.get("revision") or _resolve_revision(repo_id, repo_type)
        _warn_unpinned(f"revision of {repo_id}", "revision", rev)
        record.update(repo_id=repo_id, repo_type=repo_type, revision=rev, revision_pinned=False)
    else:
        rev = str(revision).strip().lower()
    if not _COMMIT.match(rev):
        raise CheckpointError(
            f"{repo_id}: revision {revision!r} is not pinned; give the full 40-hex commit id "
            "(branches and tags such as 'main' can change under you)")
    dest_dir.mkdir(parents=True, exist_ok=True)
    out: dict[str, Path] = {}
    for name, sha in files.items():
        _check_relative(name)
        if sha is None and name in record.get("files", {}):
            sha = record["files"][name]  # recorded on first use: verified like a pin from now on
        if sha is None:
            target = dest_dir / name
            if not target.exists():
                if hf_hub_download is None:  # pragma: no cover
                    raise CheckpointError("huggingface_hub is not installed; place the files by hand")
                try:
                    target = Path(hf_hub_download(repo_id=repo_id, filename=name, revision=rev,
                                                  repo_type=repo_type, local_dir=dest_dir))
                except Exception as e:
                    raise CheckpointError(f"could not download {repo_id}/{name} at {rev} "
                                          f"({repo_type}) into {dest_dir}: {e}") from e
            got = check_plausible(target)
            _warn_unpinned(f"{repo_id}/{name}@{rev}", f"files: {name!r}", got)
            record.setdefault("files", {})[name] = got
            record.update(repo_id=repo_id, repo_type=repo_type, revision=rev)
            record.setdefault("revision_pinned", revision is not None)
            _write_record(dest_dir, record)
            out[name] = target
            continue
        expected = _expected_sha256(sha, f"{repo_id}/{name}")
        target = dest_dir / name
        if target.exists():
            verify_file(target, expected)  # raises; a hand-placed file is never deleted
            log.info("%s: present and verified, not downloaded", target)
            out[name] = target
            continue
        if hf_hub_download is None:  # pragma: no cover
            raise CheckpointError("huggingface_hub is not installed; place the files by hand")
        log.info("downloading %s/%s@%s", repo_id, name, rev)
        try:
            got = Path(hf_hub_download(repo_id=repo_id, filename=name, revision=rev,
                                       repo_type=repo_type, local_dir=dest_dir))
        except Exception as e:  # network, auth, missing file: say what and where
            raise CheckpointError(f"could not download {repo_id}/{name} at {rev} "
                                  f"({repo_type}) into {dest_dir}: {e}") from e
        try:
            verify_file(got, expected)
        except CheckpointError as e:
            got.unlink(missing_ok=True)
            raise CheckpointError(f"downloaded {repo_id}/{name}@{rev} rejected and removed: {e}") from None
        out[name] = got
    if revision is None:
        _write_record(dest_dir, record)
    return out


def download_url(url: str, sha256: str | None, dest: str | Path, timeout: float = 60.0,
                 allow_unpinned: bool = False) -> Path:
    """Fetch ``url`` to ``dest`` (streamed to ``dest.tmp``, verified, then renamed atomically).

    A ``dest`` already present is only verified (and raises, untouched, if it is wrong).
    RobustBench hosts ``Standard.pt`` on Google Drive, which often answers with an HTML
    page instead of the file: point ``url`` at a mirror you trust, or download the file by
    hand (Drive names it ``natural.pt.tar``) and place it at ``dest``; then only the
    verification runs.  http(s) and file URLs are accepted.

    ``sha256=None`` is refused unless ``allow_unpinned`` (trust on first use, as in
    :func:`download_hf`: plausibility checks only, the hash recorded in
    ``dest.parent/dbprepro_unpinned.json`` and logged; later runs verify against the record).
    """
    dest = Path(dest)
    if sha256 is None:
        if not allow_unpinned:
            raise CheckpointError(f"{dest}: sha256 not pinned (null) and allow_unpinned is false; an "
                                  "unverified file is never accepted silently")
        record = _read_record(dest.parent)
        sha256 = record.get("files", {}).get(dest.name)
        if sha256 is None:
            if not dest.exists():
                tmp = download_url_unverified(url, dest, timeout)
                try:
                    got = check_plausible(tmp)
                except CheckpointError:
                    tmp.unlink(missing_ok=True)
                    raise
                os.replace(tmp, dest)
            else:
                got = check_plausible(dest)
            _warn_unpinned(f"{dest.name} from {url}", "sha256", got)
            record.setdefault("files", {})[dest.name] = got
            record["url"] = url
            _write_record(dest.parent, record)
            return dest
    expected = _expected_sha256(sha256, dest)
    if dest.exists():
        verify_file(dest, expected)
        log.info("%s: present and verified, not downloaded", dest)
        return dest
    tmp = download_url_unverified(url, dest, timeout)
    try:
        verify_file(tmp, expected)
    except CheckpointError as e:
        tmp.unlink(missing_ok=True)
        raise CheckpointError(f"download of {url} for {dest} rejected: {e}") from None
    os.replace(tmp, dest)
    return dest


def download_url_unverified(url: str, dest: Path, timeout: float = 60.0) -> Path:
    """Stream ``url`` to ``dest.tmp`` and return that path (the caller verifies and renames)."""
    scheme = urllib.parse.urlsplit(url).scheme.lower()
    if scheme not in ("http", "https", "file"):
        raise CheckpointError(f"{url}: unsupported URL scheme {scheme!r} (http, https or file)")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".tmp")
    request = urllib.request.Request(url, headers={"User-Agent": "dbprepro"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response, open(tmp, "wb") as f:
            shutil.copyfileobj(response, f, 1 << 20)
    except (urllib.error.URLError, OSError, ValueError) as e:
        tmp.unlink(missing_ok=True)
        raise CheckpointError(f"could not download {url} to {dest}: {e}") from e
    return tmp


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
    bad = [str(k) for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"{path}: state dict has non-tensor entries: {', '.join(bad[:10])}")
    out: dict[str, torch.Tensor] = {}
    for key, value in obj.items():
        key = str(key)
        new = key[len("module."):] if key.startswith("module.") else key
        if new in out:
            raise CheckpointError(f"{path}: both {key!r} and {new!r} present after removing 'module.'")
        out[new] = value
    return out


def load_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a state dict from ``.safetensors`` or a torch file (``.pt/.pth/.t7/.bin``).

    Torch files go through ``torch.load(..., map_location="cpu", weights_only=True)``
    only; anything needing other globals (a code payload) is refused with a
    :class:`CheckpointError`.  Common containers (``{"state_dict": ...}``,
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
