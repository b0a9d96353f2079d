"""File helpers: atomic writes and file hashes.

Results appear under their final name only when complete, so an interrupted job never leaves a
file that looks finished.

Every writer of the package goes through :func:`atomic_path` (files) or :func:`atomic_dir`
(folders such as a diffusers ``save_pretrained`` output): the content is written to a hidden
temporary sibling (``.<name>.<pid>.tmp``) and renamed onto the final name only after the writer
returned.  A rename within one folder is atomic on POSIX file systems, so a reader (or Snakemake)
sees either the old state or the complete new file, never a torn one.  On an exception the
temporary is removed; after a SIGKILL it stays behind, hidden, and is removed by
:func:`remove_stale_temporaries` when the job reruns (``pipeline.run_stage`` calls it).
"""

from __future__ import annotations

import hashlib
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pandas as pd

_TMP_SUFFIX = ".tmp"


def _tmp(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}{_TMP_SUFFIX}")


def _committed(path: Path) -> None:
    from . import faults

    faults.after_write(path)  # test-only fault injection (DBPREPRO_FAULT); a no-op otherwise


@contextmanager
def atomic_path(path) -> Iterator[Path]:
    """Yield a temporary file name beside ``path``; when the block ends without an exception the
    temporary is renamed onto ``path``, else it is removed.  Parent folders are created.
    The temporary has no meaningful suffix: give writers that infer a format from the name
    (e.g. ``savefig``) the format explicitly."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp(path)
    try:
        yield tmp
        if not tmp.exists():
            raise FileNotFoundError(f"the writer of {path} did not create its temporary file {tmp}")
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _committed(path)


@contextmanager
def atomic_dir(path) -> Iterator[Path]:
    """Like :func:`atomic_path` for a folder: yield an empty temporary folder beside ``path``;
    on success it replaces ``path`` (a previous folder of that name is removed), else it is
    removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp(path)
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        yield tmp
        if path.exists():
            old = path.with_name(f".{path.name}.{os.getpid()}.old")
            path.replace(old)
            tmp.replace(path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.replace(path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _committed(path)


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def write_parquet(df: pd.DataFrame, path) -> None:
    with atomic_path(path) as tmp:
        df.to_parquet(tmp, index=False)


def savez(path, **arrays) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, **arrays)  # to a file object: no time stamps inside, byte-reproducible


def write_text(path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def remove_stale_temporaries(paths) -> list[Path]:
    """Remove the temporaries that killed writers left beside ``paths`` (any pid); returns them."""
    removed = []
    for p in map(Path, paths):
        if not p.parent.is_dir():
            continue
        for stale in p.parent.glob(f".{p.name}.*"):
            if stale.name.endswith((_TMP_SUFFIX, ".old")):
                shutil.rmtree(stale) if stale.is_dir() else stale.unlink(missing_ok=True)
                removed.append(stale)
    return removed
