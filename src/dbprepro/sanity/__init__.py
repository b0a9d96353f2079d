"""The sanity battery: checks that flag a weak evaluation (Carlini et al. 2019, arXiv 1902.06705,
Sec. 5-6; Tramer et al. 2020), run on each defense of ``sanity.defenses``.

- ``checks.py``: the decisions (pure functions of per-image 0/1 arrays; paired bootstrap intervals
  over images; ``pass`` / ``flag``): epsilon sweep, iterations, gradient-free (Square), transfer,
  unbounded attack;
- ``plan.py``: which jobs run and which attack runs of the grid they read (no network built);
- ``runner.py``: the battery's own attack runs on one defense and threat model (per-image records);
- ``table.py``: ``sanity.csv``; ``figure.py``: ``sanity.png``; ``cost.py``: the battery's network calls.

A flag is a finding of the evaluation, reported as it is.
"""

from .checks import CHECKS, FLAG, PASS, Check, iterations_check, not_stronger_check, paired_excess, sweep_check, \
    unbounded_check

__all__ = ["CHECKS", "FLAG", "PASS", "Check", "battery_jobs", "comparison_runs", "iterations_check",
           "not_stronger_check", "paired_excess", "sweep_check", "transfer_sources", "unbounded_check"]


def __getattr__(name: str):
    """The plan's functions, imported on first use: the battery's table and figure (light stages,
    tests/test_light_stages.py) need only its randomness classes."""
    if name in ("battery_jobs", "comparison_runs", "transfer_sources"):
        from . import plan

        return getattr(plan, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
