"""Run-time set-up shared by every stage: device, threads, determinism, logging, provenance."""

from __future__ import annotations

import logging
import os
import platform
import sys
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger("dbprepro")


def resolve_device(device: str = "auto") -> torch.device:
    """``auto`` -> cuda when available, else cpu; ``cuda`` without a GPU is an error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' was requested but torch sees no GPU (set device: auto or cpu)")
    return torch.device(device)


def configure_torch(threads: int | None = None, deterministic: bool = True) -> None:
    """Thread count and determinism flags (recorded by :func:`provenance`)."""
    if threads:
        torch.set_num_threads(int(threads))
    torch.use_deterministic_algorithms(bool(deterministic), warn_only=False)
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = bool(deterministic)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    if deterministic:
        # needed by cuBLAS for deterministic matmuls on GPUs (no effect on CPU)
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")


def setup_logging(logfile: str | Path | None = None, level: int = logging.INFO) -> None:
    """Log to ``logfile`` (or stderr): time, level, logger, message.  With a log file, stderr is
    redirected into it too, so tqdm progress bars and warnings land in the rule's log."""
    if logfile:
        # the stage's log file gets everything: logging, tqdm bars, warnings, tracebacks
        Path(logfile).parent.mkdir(parents=True, exist_ok=True)
        sys.stderr = open(logfile, "a", buffering=1)  # noqa: SIM115 - lives as long as the job
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    logging.basicConfig(level=level, handlers=handlers, force=True,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def provenance() -> dict[str, Any]:
    """Versions, thread count and determinism flags of this process."""
    import diffusers
    import numpy

    info: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "numpy": numpy.__version__,
        "threads": torch.get_num_threads(),
        "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
        "cudnn_benchmark": torch.backends.cudnn.benchmark,
        "tf32": torch.backends.cuda.matmul.allow_tf32,
        "cuda": torch.version.cuda,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    try:
        from importlib.metadata import version

        info["dbprepro"] = version("dbprepro")
    except Exception:  # pragma: no cover - not installed as a distribution
        info["dbprepro"] = None
    return info
