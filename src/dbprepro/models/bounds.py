"""Errors, resource bounds and bounded descriptions shared by the checkpoint loaders (issue 25).

:class:`CheckpointError` is every loader's refusal; :class:`UnsafePickleError` names what a pickle reader refused
(an opcode, a global, a key), :class:`LimitExceeded` the bound a file would pass.  :class:`Limits` holds the
bounds of one load (file size, allocation as a multiple of the file size, nesting depth, object count, zip
records, wall clock) and :class:`Budget` the allocation and time left to it.  :func:`summary` describes a value
read from a file by its type and size (a short string by its first characters): error messages never ``repr``
file data, whose repr can be exponentially long.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any


class CheckpointError(ValueError):
    """A checkpoint or data file is missing, not what was pinned, unsafe, or does not fit."""


class UnsafePickleError(CheckpointError):
    """The stream needs something outside the reader's allowlist; nothing of it was executed."""


class LimitExceeded(UnsafePickleError):
    """The stream would pass one of the reader's resource bounds (:class:`Limits`)."""


@dataclass(frozen=True)
class Limits:
    """Resource bounds of one load.  ``alloc_ratio`` x file size + ``alloc_slack`` bytes is the most the
    reader allocates; the defaults read a 1.7 GB Score SDE checkpoint and EDM's 220 MB pickles."""

    max_file_bytes: int = 4 << 30  #: largest file read
    alloc_ratio: float = 3.0  #: total allocation <= alloc_ratio x file size + alloc_slack
    alloc_slack: int = 32 << 20
    max_depth: int = 100  #: nesting depth of any object, and of MARKs
    max_objects: int = 2_000_000  #: values pushed by the stream
    max_seconds: float = 600.0  #: wall-clock bound of one load
    max_zip_entries: int = 100_000  #: records of a torch zip file

    def budget(self, file_bytes: int) -> "Budget":
        return Budget(int(self.alloc_ratio * file_bytes) + self.alloc_slack,
                      time.monotonic() + self.max_seconds, self.max_seconds)


DEFAULT_LIMITS = Limits()


@dataclass
class Budget:
    """The allocation and time left to one load (shared by nested readers of the same file)."""

    bytes_left: int
    deadline: float
    seconds: float
    used: int = 0

    def charge(self, nbytes: int, what: str) -> None:
        if nbytes > self.bytes_left:
            raise LimitExceeded(f"{what} would allocate {nbytes} bytes; the allocation bound has "
                                f"{self.bytes_left} left ({self.used} used; Limits.alloc_ratio)")
        self.bytes_left -= nbytes
        self.used += nbytes

    def check_time(self) -> None:
        if time.monotonic() > self.deadline:
            raise LimitExceeded(f"wall-clock bound of {self.seconds:g} s passed (Limits.max_seconds)")


def summary(obj: Any) -> str:
    """A bounded description of a stream value: its type and size, or a short string's first 60 characters."""
    if isinstance(obj, str):
        return repr(obj[:60]) + ("..." if len(obj) > 60 else "")
    if isinstance(obj, (bool, type(None), float)) or (isinstance(obj, int) and abs(obj) < 10 ** 15):
        return repr(obj)
    kind = type(obj).__name__
    try:
        size = len(obj) if isinstance(obj, (bytes, bytearray, tuple, list, dict, set, frozenset)) else None
    except Exception:  # pragma: no cover - builtin containers always have a length
        size = None
    return f"{kind} of {size}" if size is not None else f"a {kind}"


def binds(fn: Any, args: tuple) -> bool:
    """Whether ``fn`` takes ``args`` by its signature (so a TypeError it raised is about their values)."""
    import inspect

    try:
        inspect.signature(fn).bind(*args)
    except (TypeError, ValueError):
        return False
    return True
