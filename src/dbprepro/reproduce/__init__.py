"""Reproduction within noise: compare a recorded run with a new one (``dbprepro compare-runs``).

On one platform a rerun is bit for bit identical (CI checks it).  Across CPUs and thread counts the
float kernels differ, so the numbers move slightly; :func:`compare_runs` decides whether they moved
within noise, per table row (:mod:`.tables`), per attack run's flipped per-image outcomes
(:mod:`.records`) and per claim (:mod:`.claims`), with the rules of :class:`Tolerance`
(:mod:`.tolerance`), and :func:`write_reports` writes the CSV and Markdown reports (:mod:`.report`).
"""

from .compare import Comparison, RunTree, compare_runs
from .report import markdown, write_reports
from .tolerance import Tolerance

__all__ = ["Comparison", "RunTree", "Tolerance", "compare_runs", "markdown", "write_reports"]
