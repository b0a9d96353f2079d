"""What the figures of both papers share: the non-interactive backend, the theme, reading an
``.npz`` and writing a figure as PNG and PDF (PDF without a creation date, so reruns are
byte-stable)."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import seaborn as sns  # noqa: E402


def theme() -> None:
    sns.set_theme(context="paper", style="whitegrid", font_scale=1.1)


def save(fig, png, pdf) -> None:
    from .io import atomic_path

    with atomic_path(png) as tmp:
        fig.savefig(tmp, format="png", dpi=150, bbox_inches="tight")
    with atomic_path(pdf) as tmp:
        fig.savefig(tmp, format="pdf", bbox_inches="tight", metadata={"CreationDate": None})
    plt.close(fig)


def load_npz(path) -> dict[str, np.ndarray]:
    with np.load(path) as z:
        return {k: z[k] for k in z.files}
