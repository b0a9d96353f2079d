"""What "within noise" means for one number, one table cell and one attack run's outcomes.

Two runs of the same commit and configuration are bit-for-bit identical on one platform; across
CPUs and thread counts float kernels reduce in another order, models train to slightly other
weights, and a few images change their outcome.  :class:`Tolerance` bounds how far a number may
move for the runs still to count as the same result.  A numeric cell is *within tolerance* when
any of these rules admits the difference between its recorded value r and its new value v:

``absolute/relative``  |v - r| <= atol + rtol x |r| (every number); in a signed column (values of
                       both signs in the recorded table: differences, gains, correlations) the
                       relative part is taken of the column's largest |value|, as a number near 0
                       that is a difference of two others has no scale of its own;
``interval``           the cell is an estimate or a bound of a confidence interval in the same row
                       (columns ``<x>ci_low<y>`` / ``<x>ci_high<y>``; the estimate is the column
                       just before ``ci_low``): |v - r| <= the larger half-width of the two rows'
                       intervals, i.e. the move is smaller than the sampling uncertainty the table
                       itself reports;
``images``             the row counts images (a column ``n_images``, ``n_images<y>`` or ``n``) and
                       both values are shares of them (value x n is a whole number, to the table's
                       rounding): the share moved by at most max(flip_images, flip_share x n)
                       images, the same allowance as an attack run's flipped outcomes; a count
                       column (whole numbers only, some above 1, e.g. images removed by a stage)
                       of such a row may move by as many images.  For a share or a count this
                       rule alone decides (an accuracy over n images moves by images, whatever
                       its interval);
``p-value``            columns ``p``, ``p_value``, ``p_holm`` and ``*_p``: both on the same side of
                       ``alpha`` (p-values move a lot with a single image near a decision; the
                       decision is what a table reports).

A text cell is within tolerance when it equals the other once its numbers are blanked and each
pair of its numbers passes the absolute/relative rule (e.g. a sanity row's ``detail``).
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass

#: statuses of a compared item (a table row, a table, an attack run, a claim)
IDENTICAL, WITHIN, DIFFERENT = "identical", "within tolerance", "different"
ONLY_RECORDED, ONLY_NEW = "only in recorded", "only in new"
#: statuses that make two runs disagree: a recorded result that moved beyond noise or is missing
#: (a result only the new run has cannot contradict the recorded one and is listed as a note)
FAILING = (DIFFERENT, ONLY_RECORDED)

_NUMBER = re.compile(r"[-+]?(?:\d+\.\d*|\.\d+|\d+)(?:[eE][-+]?\d+)?")
_P_COLUMNS = re.compile(r"^(p|p_value|p_holm|.+_p)$")


@dataclass(frozen=True)
class Tolerance:
    """The noise two runs may differ by (see the module docstring for the rules)."""

    atol: float = 0.01
    rtol: float = 0.05
    flip_images: int = 2
    flip_share: float = 0.02
    alpha: float = 0.05

    def __post_init__(self):
        for name in ("atol", "rtol", "flip_share"):
            if not (getattr(self, name) >= 0 and math.isfinite(getattr(self, name))):
                raise ValueError(f"tolerance {name} must be a finite number >= 0, got {getattr(self, name)}")
        if int(self.flip_images) != self.flip_images or self.flip_images < 0:
            raise ValueError(f"tolerance flip_images must be a whole number >= 0, got {self.flip_images}")
        if not 0 < self.alpha < 1:
            raise ValueError(f"tolerance alpha must lie in (0, 1), got {self.alpha}")

    def allowed_flips(self, n: int) -> float:
        """Images of ``n`` whose outcome may change within noise: max(flip_images, flip_share x n)."""
        return max(float(self.flip_images), self.flip_share * n)

    def close(self, recorded: float, new: float, scale: float = 0.0) -> bool:
        """The absolute/relative rule; ``scale``: the signed column's largest |value| (else 0)."""
        return abs(new - recorded) <= self.atol + self.rtol * max(abs(recorded), scale) + 1e-12

    def describe(self) -> str:
        return (f"|new - recorded| <= {self.atol:g} + {self.rtol:g} x |recorded| (signed columns: x the column's "
                f"largest |value|), or within the larger CI half-width of the two rows, or (shares and counts of "
                f"n images) at most max({self.flip_images}, {self.flip_share:g} x n) images; p-values on the same "
                f"side of alpha = {self.alpha:g}; "
                f"attack runs: at most max({self.flip_images}, {self.flip_share:g} x n) of n images flipped")

    def as_dict(self) -> dict:
        return asdict(self)


def is_missing(value) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def as_number(value) -> float | None:
    """``value`` as a float, or None for text (bools count as numbers)."""
    if isinstance(value, (bool, int, float)) and not isinstance(value, str):
        return float(value)
    try:
        import numpy as np

        if isinstance(value, np.generic):
            return float(value)
    except ImportError:  # pragma: no cover
        pass
    return None


def is_p_column(name: str) -> bool:
    return bool(_P_COLUMNS.match(name))


def ci_groups(columns: list[str]) -> dict[str, tuple[str, str]]:
    """Column -> (its interval's low column, high column), for every estimate and bound of an
    interval: ``<x>ci_low<y>`` pairs with ``<x>ci_high<y>``, the estimate is the column before."""
    out = {}
    for i, col in enumerate(columns):
        if "ci_low" not in col:
            continue
        high = col.replace("ci_low", "ci_high", 1)
        if high not in columns:
            continue
        members = [col, high] + ([columns[i - 1]] if i > 0 and columns[i - 1] != high else [])
        for m in members:
            out[m] = (col, high)
    return out


def n_column(name: str, columns: list[str]) -> str | None:
    """The column counting the images of ``name``'s share: ``n_images<y>`` for a column ending in
    ``<y>`` (e.g. robust_dwbox: n_images_dwbox), else ``n_images``, else ``n``."""
    for col in columns:
        if col.startswith("n_images_") and name.endswith(col[len("n_images"):]) and col != name:
            return col
    return next((c for c in ("n_images", "n") if c in columns and c != name), None)


def _is_share(value: float, n: float, decimals: int = 4) -> bool:
    k = value * n
    return abs(k - round(k)) <= 0.5 * 10 ** -decimals * n + 1e-9


@dataclass(frozen=True)
class Shape:
    """What the rules need to know of a table's columns: their order, the interval groups
    (:func:`ci_groups`), the count columns and the scale of each signed column."""

    columns: list
    groups: dict
    counts: frozenset = frozenset()
    scales: dict = None

    @classmethod
    def of(cls, columns: list[str], values: dict[str, list]) -> Shape:
        """From the recorded table's columns and their values (column -> list)."""
        counts, scales = set(), {}
        for col in columns:
            nums = [x for x in (as_number(v) for v in values.get(col, [])) if x is not None and math.isfinite(x)]
            if not nums or any(isinstance(v, bool) for v in values.get(col, [])):
                continue
            if all(x == round(x) for x in nums) and max(nums) > 1:
                counts.add(col)
            if min(nums) < 0 < max(nums):
                scales[col] = max(abs(x) for x in nums)
        return cls(list(columns), ci_groups(list(columns)), frozenset(counts), scales)


def compare_cell(col: str, recorded, new, row_recorded: dict, row_new: dict, shape: Shape,
                 tol: Tolerance) -> tuple[str, str]:
    """(status, rule) of one cell: ``identical``, ``within tolerance`` (the rule that admitted it)
    or ``different``."""
    columns, groups = shape.columns, shape.groups
    if (is_missing(recorded) and is_missing(new)) or recorded == new:
        return IDENTICAL, ""
    r, v = as_number(recorded), as_number(new)
    if r is None or v is None or is_missing(recorded) or is_missing(new):
        if isinstance(recorded, str) and isinstance(new, str) and _text_close(recorded, new, tol):
            return WITHIN, "numbers in text"
        return DIFFERENT, ""
    if is_p_column(col):
        return (WITHIN, "p-value side") if (r < tol.alpha) == (v < tol.alpha) else (DIFFERENT, "")
    moved = _images_moved(col, r, v, row_recorded, row_new, shape)
    if moved is not None:  # a share or a count of the row's images: the images rule alone decides
        return (WITHIN, "images") if moved <= tol.allowed_flips(int(_num(row_recorded[n_column(col, columns)]))) \
            + 1e-6 else (DIFFERENT, "")
    if tol.close(r, v, (shape.scales or {}).get(col, 0.0)):
        return WITHIN, "atol/rtol"
    if col in groups:
        lo, hi = groups[col]
        halves = [abs(_num(row[hi]) - _num(row[lo])) / 2 for row in (row_recorded, row_new)]
        halves = [h for h in halves if math.isfinite(h)]
        if halves and abs(v - r) <= max(halves) + 1e-9:
            return WITHIN, "CI half-width"
    return DIFFERENT, ""


def _images_moved(col: str, r: float, v: float, row_recorded: dict, row_new: dict, shape: Shape) -> float | None:
    """How many images a share or count of the row's n images moved by; None when the cell is neither."""
    n_col = n_column(col, shape.columns)
    if n_col is None:
        return None
    n = _num(row_recorded.get(n_col))
    if not (math.isfinite(n) and n >= 1 and n == _num(row_new.get(n_col))):
        return None
    if col in shape.counts and r == round(r) and v == round(v):
        return abs(v - r)
    if _is_share(r, n) and _is_share(v, n):
        return float(abs(round(v * n) - round(r * n)))  # whole images (the tables round to 4 decimals)
    return None


def _num(value) -> float:
    x = as_number(value)
    return float("nan") if x is None else x


def _text_close(a: str, b: str, tol: Tolerance) -> bool:
    if _NUMBER.sub("#", a) != _NUMBER.sub("#", b):
        return False
    na, nb = _NUMBER.findall(a), _NUMBER.findall(b)
    return all(tol.close(float(x), float(y)) for x, y in zip(na, nb))
