"""Fetch, verify and load third-party files (weights, data) without trusting them.

Every file that enters the pipeline from outside is pinned by a sha256 and checked with
:func:`verify_file` before use; Hugging Face downloads are pinned to a commit as well.
A file that is already present and verifies is never fetched again, so a re-run works
offline.  Weights are read as ``safetensors``, through ``torch.load(weights_only=True)`` after
:func:`.torch_guard.guard_torch_file`, or by EDM's pickle reader (:mod:`.edm_pickle`): a pickle that
carries code is refused, never executed.  An unpinned file's sha256 is printed and recorded before
anything parses it (:func:`trusted_sha256` gives the hash to read it under).

This module fetches (:func:`download_hf`, :func:`download_url`, trust on first use of unpinned
files); checking and loading live in :mod:`dbprepro.models.verification` and are re-exported here.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from .verification import CheckpointError, _expected_sha256, check_plausible, verify_file
from .verification import load_state_dict, load_weights_into  # noqa: F401 - re-exported, their old home

try:  # imported at module level so tests can monkeypatch ``checkpoints.hf_hub_download``
    from huggingface_hub import hf_hub_download
except ImportError:  # pragma: no cover - huggingface_hub is a declared dependency
    hf_hub_download = None

log = logging.getLogger(__name__)

_COMMIT = re.compile(r"^[0-9a-f]{40}$")


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
    from ..io import write_text

    write_text(folder / UNPINNED_RECORD, json.dumps(record, indent=2, sort_keys=True) + "\n")


def _warn_unpinned(what: str, key: str, value: str) -> None:
    log.warning("UNPINNED %s: accepted on first use WITHOUT a pinned hash; pin it in the config: %s: %s",
                what, key, value)
    print(f"TRUST ON FIRST USE: {what}: {key}: {value} (not checked against a pin; recorded in "
          f"{UNPINNED_RECORD}; paste it into the config)", flush=True)


def trusted_sha256(dest: str | Path, sha256: str | None) -> str:
    """The hash a downloaded file is read under: its pin, else the one :func:`download_url` recorded on first
    use in ``dbprepro_unpinned.json`` beside it.  A file with neither is refused, so an unpinned file (a pickle
    above all) is never parsed without its hash written down first."""
    if sha256 is not None:
        return _expected_sha256(sha256, dest)
    dest = Path(dest)
    recorded = _read_record(dest.parent).get("files", {}).get(dest.name)
    if recorded is None:
        raise CheckpointError(f"{dest}: neither pinned nor recorded in {dest.parent / UNPINNED_RECORD}; "
                              "an unpinned file is read only after its sha256 is recorded (trust on first use)")
    return _expected_sha256(recorded, dest)


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
