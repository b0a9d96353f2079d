"""Two runs' tables, row by row: identical, within tolerance or different.

Rows are aligned by their key: the shortest leading run of the table's non-float columns (text,
whole numbers, booleans, in column order; e.g. ``defense, threat, norm, setting, attack,
evaluation`` in ``p1_table_main``) that names every row once in both runs.  A table without such
a key is aligned by the full non-float columns and the order of the rows sharing them.  Each
other column common to both runs is compared cell by cell (:func:`~.tolerance.compare_cell`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from .tolerance import DIFFERENT, IDENTICAL, ONLY_NEW, ONLY_RECORDED, WITHIN, Shape, Tolerance, compare_cell

#: tables compared by their own rule, not cell by cell (claims.csv: :mod:`.claims`)
SPECIAL = ("claims.csv",)


@dataclass
class RowDiff:
    """One row that is not identical: its key, status and the cells that moved (column, recorded,
    new, rule that admitted it or '' for different)."""

    key: str
    status: str
    cells: list[tuple[str, object, object, str]] = field(default_factory=list)

    def describe(self, limit: int = 4) -> str:
        if self.status in (ONLY_RECORDED, ONLY_NEW):
            return f"{self.key} ({self.status})"
        shown = [c for c in self.cells if (c[3] == "") == (self.status == DIFFERENT)][:limit]
        cells = ", ".join(f"{c}: {_fmt(r)} -> {_fmt(v)}" for c, r, v, _ in shown)
        more = len([c for c in self.cells if (c[3] == "") == (self.status == DIFFERENT)]) - len(shown)
        return f"{self.key} ({cells}{f', +{more} more' if more > 0 else ''})"


@dataclass
class TableComparison:
    name: str
    status: str
    rows: int = 0
    identical: int = 0
    within: int = 0
    different: int = 0
    key: list[str] = field(default_factory=list)
    diffs: list[RowDiff] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def largest_move(self) -> str:
        """The numeric cell within tolerance that moved most (relative to its recorded value), as
        'column: recorded -> new (rule)'; '' when none moved."""
        best, text = -1.0, ""
        for d in self.diffs:
            for col, r, v, rule in d.cells:
                if rule and isinstance(r, (int, float)) and isinstance(v, (int, float)):
                    rel = abs(v - r) / max(abs(r), 1e-12)
                    if rel > best:
                        best, text = rel, f"{col}: {_fmt(r)} -> {_fmt(v)} ({rule})"
        return text


def _fmt(value) -> str:
    return f"{value:.6g}" if isinstance(value, float) else str(value)


def read_table(path: Path) -> pd.DataFrame:
    return pd.read_csv(path, keep_default_na=True)


def key_columns(a: pd.DataFrame, b: pd.DataFrame) -> tuple[list[str], bool]:
    """(key columns, unique): the shortest unique prefix of the non-float columns both share."""
    cands = [c for c in a.columns if c in b.columns
             and not pd.api.types.is_float_dtype(a[c]) and not pd.api.types.is_float_dtype(b[c])]
    for i in range(1, len(cands) + 1):
        k = cands[:i]
        if not a.duplicated(k).any() and not b.duplicated(k).any():
            return k, True
    return cands, False


def _keyed(df: pd.DataFrame, key: list[str]) -> dict[tuple, dict]:
    occurrence = df.groupby(key, dropna=False, sort=False).cumcount() if key else pd.Series(range(len(df)))
    out = {}
    for row, occ in zip(df.to_dict("records"), occurrence):  # records keep each column's type (ids stay ints)
        row = {c: _plain(v) for c, v in row.items()}
        out[tuple(row[k] for k in key) + (int(occ),)] = row
    return out


def _plain(value):
    return value.item() if hasattr(value, "item") else value


def _name_key(key: list[str], values: tuple, unique: bool) -> str:
    named = ", ".join(f"{k}={v}" for k, v in zip(key, values))
    return named if unique else f"{named} #{values[-1] + 1}" if key else f"row {values[-1] + 1}"


def compare_table(name: str, recorded: Path, new: Path, tol: Tolerance) -> TableComparison:
    """Compare the table ``name`` of two runs (CSV files)."""
    if recorded.read_bytes() == new.read_bytes():
        n = len(read_table(new))
        return TableComparison(name, IDENTICAL, rows=n, identical=n)
    a, b = read_table(recorded), read_table(new)
    res = TableComparison(name, IDENTICAL)
    missing = [c for c in a.columns if c not in b.columns]
    extra = [c for c in b.columns if c not in a.columns]
    if missing:
        res.notes.append(f"columns only in recorded: {', '.join(missing)}")
    if extra:
        res.notes.append(f"columns only in new: {', '.join(extra)}")
    key, unique = key_columns(a, b)
    res.key = key
    ra, rb = _keyed(a, key), _keyed(b, key)
    columns = [c for c in a.columns if c in b.columns]
    shape = Shape.of(columns, {c: a[c].tolist() for c in columns})
    for k in list(ra) + [k for k in rb if k not in ra]:
        label = _name_key(key, k, unique)
        if k not in rb or k not in ra:
            res.diffs.append(RowDiff(label, ONLY_RECORDED if k not in rb else ONLY_NEW))
            res.different += 1
            continue
        cells = []
        for c in columns:
            if c in key:
                continue
            status, rule = compare_cell(c, ra[k][c], rb[k][c], ra[k], rb[k], shape, tol)
            if status != IDENTICAL:
                cells.append((c, ra[k][c], rb[k][c], rule if status == WITHIN else ""))
        status = DIFFERENT if any(rule == "" for *_, rule in cells) else WITHIN if cells else IDENTICAL
        if status == IDENTICAL:
            res.identical += 1
        else:
            res.diffs.append(RowDiff(label, status, cells))
            res.within += status == WITHIN
            res.different += status == DIFFERENT
    res.rows = len(set(ra) | set(rb))
    res.status = DIFFERENT if res.different or missing else WITHIN if res.within or extra else IDENTICAL
    return res


def compare_tables(recorded_dir: Path, new_dir: Path, tol: Tolerance) -> list[TableComparison]:
    """Every CSV of either tables folder (matched by file name; :data:`SPECIAL` tables excluded)."""
    names_a = {p.name for p in recorded_dir.glob("*.csv")} - set(SPECIAL)
    names_b = {p.name for p in new_dir.glob("*.csv")} - set(SPECIAL)
    out = []
    for name in sorted(names_a | names_b):
        if name not in names_b:
            out.append(TableComparison(name, ONLY_RECORDED, notes=["the new run has no such table"]))
        elif name not in names_a:
            out.append(TableComparison(name, ONLY_NEW, notes=["the recorded run has no such table"]))
        else:
            out.append(compare_table(name, recorded_dir / name, new_dir / name, tol))
    return out
