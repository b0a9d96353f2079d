"""The locked environment: ``envs/requirements.lock`` against what this Python has installed.

``scripts/setup.sh`` installs the lock exactly (``pip install --require-hashes --no-deps``) and writes
``<venv>/dbprepro-lock.json`` (:data:`MARKER`): which lock, its sha256, and where torch came from -
``"lock"``, or ``"TORCH_SPEC"`` when the user gave a torch of their own (a CUDA build on a cluster).
:func:`lock_status` hashes the lock and compares its pins with :mod:`importlib.metadata`; it starts no
subprocess, so :func:`dbprepro.runtime.provenance` can call it in every job.  Refresh the lock with
``bash scripts/lock.sh``.
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
LOCK = ROOT / "envs" / "requirements.lock"
MARKER = "dbprepro-lock.json"
# installed beside the lock on purpose: the package itself (editable) and the installer
NOT_LOCKED = ("dbprepro", "pip")

_PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;\\]+)")


def normalize(name: str) -> str:
    """PEP 503 name: lower case, runs of ``-_.`` as one ``-``."""
    return re.sub(r"[-_.]+", "-", name).lower()


def parse_lock(path: str | Path = LOCK) -> dict[str, dict[str, Any]]:
    """``{normalized name: {"name", "version", "hashes"}}`` of a hashed requirements file; every
    requirement line must be an ``==`` pin (``ValueError`` naming the line otherwise)."""
    text = Path(path).read_text()
    entries: dict[str, dict[str, Any]] = {}
    for logical in re.sub(r"\\\n", " ", text).splitlines():
        line = logical.split(" #", 1)[0].strip()
        if not line or line.startswith("#"):
            continue
        m = _PIN.match(line)
        if m is None:
            raise ValueError(f"{path}: not an exact pin: {line[:80]!r}")
        name, version = m.groups()
        key = normalize(name)
        if key in entries:
            raise ValueError(f"{path}: {name} is pinned twice")
        entries[key] = {"name": name, "version": version,
                        "hashes": re.findall(r"--hash=(sha256:[0-9a-f]{64})", line)}
    return entries


def sha256(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def read_marker(prefix: str | Path | None = None) -> dict[str, Any] | None:
    """What ``scripts/setup.sh`` recorded in this environment (``None``: not made by it)."""
    path = Path(sys.prefix if prefix is None else prefix) / MARKER
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def installed_versions() -> dict[str, str]:
    """``{normalized name: version}`` of every distribution on ``sys.path`` (first one wins, as for import)."""
    out: dict[str, str] = {}
    for dist in metadata.distributions():
        # the Name and Version headers read directly: 10x faster than parsing the whole METADATA
        head = (dist.read_text("METADATA") or dist.read_text("PKG-INFO") or "").split("\n\n", 1)[0]
        name, version = (re.search(rf"^{key}: *(\S+)", head, re.M) for key in ("Name", "Version"))
        if name and version:
            out.setdefault(normalize(name.group(1)), version.group(1))
    return out


def _same(a: str, b: str) -> bool:
    try:
        from packaging.version import InvalidVersion, Version
    except ImportError:  # pragma: no cover - packaging is in the lock
        return a == b
    try:
        return Version(a) == Version(b)
    except InvalidVersion:
        return a == b


def lock_status(lock: str | Path = LOCK, installed: dict[str, str] | None = None,
                marker: dict[str, Any] | None | bool = True) -> dict[str, Any]:
    """The lock's sha256 and whether this environment has exactly its versions.

    ``mismatches`` lists ``"name: lock X, installed Y"`` (or ``not installed``); torch is left out of the
    comparison only when the marker says it came from ``TORCH_SPEC``.  ``not_in_lock`` lists installed
    distributions the lock does not pin (besides :data:`NOT_LOCKED`).  ``marker=True`` reads this
    environment's marker; pass a dict (or ``None``) to check another.
    """
    if marker is True:
        marker = read_marker()
    marker = marker or None
    path = Path(lock)
    status: dict[str, Any] = {"lock": str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)}
    if not path.is_file():
        return {**status, "lock_sha256": None, "matches": None, "mismatches": [], "not_in_lock": [],
                "torch_source": (marker or {}).get("torch_source"), "note": "lock file not found"}
    pins = parse_lock(path)
    have = installed_versions() if installed is None else {normalize(k): v for k, v in installed.items()}
    torch_source = marker.get("torch_source") if marker else None
    skip = {"torch"} if torch_source == "TORCH_SPEC" else set()
    mismatches = []
    for key, pin in sorted(pins.items()):
        if key in skip:
            continue
        got = have.get(key)
        if got is None:
            mismatches.append(f"{pin['name']}: lock {pin['version']}, not installed")
        elif not _same(got, pin["version"]):
            mismatches.append(f"{pin['name']}: lock {pin['version']}, installed {got}")
    status.update({
        "lock_sha256": sha256(path),
        "matches": not mismatches,
        "mismatches": mismatches,
        "not_in_lock": sorted(k for k in have if k not in pins and k not in NOT_LOCKED),
        # "lock": torch is the lock's; "TORCH_SPEC": the user's (torch_spec says which); None: no marker,
        # the environment was not made by scripts/setup.sh (torch is then compared like every other pin)
        "torch_source": torch_source,
        "torch_spec": (marker or {}).get("torch_spec") or None,
        "installed_from_sha256": (marker or {}).get("lock_sha256"),
    })
    return status


def format_status(status: dict[str, Any]) -> list[str]:
    """Lines for ``dbprepro doctor``."""
    n = len(status["mismatches"])
    torch = status["torch_source"] or "unknown (no marker: this environment was not made by scripts/setup.sh)"
    if status["torch_source"] == "TORCH_SPEC":
        torch = f"TORCH_SPEC={status['torch_spec']} (torch not compared with the lock)"
    lines = [f"lock: {status['lock']}", f"lock sha256: {status['lock_sha256']}",
             "installed versions: " + ("match the lock" if status["matches"] else
                                       "lock file not found" if status["matches"] is None else
                                       f"{n} differ from the lock (bash scripts/setup.sh brings them to it)"),
             f"torch from: {torch}"]
    lines += [f"  differs: {m}" for m in status["mismatches"]]
    if status.get("installed_from_sha256") and status["installed_from_sha256"] != status["lock_sha256"]:
        lines.append(f"  set up from another lock: sha256 {status['installed_from_sha256']}")
    if status["not_in_lock"]:
        lines.append(f"  installed but not in the lock: {', '.join(status['not_in_lock'])}")
    return lines
