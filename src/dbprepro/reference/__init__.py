"""The papers' numbers the reproduction targets, beside the reproduced values.

``paper_numbers.csv`` (in this folder) lists every number of both papers that a table of the
DAG reproduces (source: ``../shared/reference/methods.md``, with its confidence), and where the
reproduced value is: ``reproduced_table`` (a file in ``results/tables/``), ``row_filter``
(``column=value`` pairs joined by ``;``, values compared as text; exactly one row must match)
and ``column``; ``scale`` converts the table's unit to the paper's (fractions -> percent).

:func:`paper_vs_reproduced` joins them; a table that is absent (a part of the DAG switched off)
or a filter that matches no row gives NaN and a ``status``, never an error; a filter that
matches several rows is an error (an ambiguous reference is a bug).  The ``dataset`` column
names the data the reproduced value comes from: on the embedded digits default the values are
of digits, not CIFAR-10.
"""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd

PAPER_NUMBERS = Path(__file__).with_name("paper_numbers.csv")
COLUMNS = ("key", "value", "unit", "paper", "table_or_figure", "confidence", "description",
           "reproduced_table", "row_filter", "column", "scale")


def load_paper_numbers(path: str | Path = PAPER_NUMBERS) -> pd.DataFrame:
    ref = pd.read_csv(path, dtype={"row_filter": str, "reproduced_table": str, "column": str})
    missing = [c for c in COLUMNS if c not in ref.columns]
    if missing:
        raise ValueError(f"{path}: missing column(s) {missing}")
    if ref["key"].duplicated().any():
        raise ValueError(f"{path}: duplicate keys {sorted(ref.loc[ref['key'].duplicated(), 'key'])}")
    return ref


def parse_filter(text) -> dict[str, str]:
    """``"a=1;b=x"`` -> ``{"a": "1", "b": "x"}`` (empty or NaN -> no condition)."""
    if text is None or (isinstance(text, float) and math.isnan(text)) or not str(text).strip():
        return {}
    out = {}
    for part in str(text).split(";"):
        if "=" not in part:
            raise ValueError(f"row filter {text!r}: {part!r} is not column=value")
        k, v = part.split("=", 1)
        out[k.strip()] = v.strip()
    return out


def _as_text(series: pd.Series) -> pd.Series:
    return series.map(lambda v: "" if pd.isna(v) else (str(int(v)) if isinstance(v, float) and v.is_integer()
                                                          else str(v)))


def lookup(table: pd.DataFrame, row_filter, column: str) -> tuple[float, str, dict]:
    """(value, status, matched row) of ``column`` in the one row of ``table`` matching ``row_filter``."""
    cond = parse_filter(row_filter)
    mask = pd.Series(True, index=table.index)
    for k, v in cond.items():
        if k not in table.columns:
            return float("nan"), f"no column {k!r}", {}
        mask &= _as_text(table[k]) == v
    rows = table[mask]
    if rows.empty:
        return float("nan"), "no matching row", {}
    if len(rows) > 1:
        raise ValueError(f"row filter {row_filter!r} matches {len(rows)} rows; make it specific")
    if column not in table.columns:
        return float("nan"), f"no column {column!r}", {}
    value = rows.iloc[0][column]
    try:
        value = float(value)
    except (TypeError, ValueError):
        return float("nan"), f"not a number: {value!r}", {}
    return value, "ok" if not math.isnan(value) else "value is NaN", rows.iloc[0].to_dict()


def paper_vs_reproduced(tables_dir: str | Path, dataset: str, config_name: str = "",
                        reference: pd.DataFrame | None = None) -> pd.DataFrame:
    """One row per paper number: the paper's value beside the reproduced one (in the paper's unit)."""
    ref = load_paper_numbers() if reference is None else reference
    tables_dir = Path(tables_dir)
    cache: dict[str, pd.DataFrame | None] = {}
    rows = []
    for r in ref.itertuples(index=False):
        name = r.reproduced_table
        if name not in cache:
            path = tables_dir / name
            cache[name] = pd.read_csv(path) if path.is_file() else None
        table = cache[name]
        if table is None:
            value, status, matched = float("nan"), f"table {name} not built", {}
        else:
            value, status, matched = lookup(table, r.row_filter, r.column)
        reproduced = value * float(r.scale)
        n = matched.get("n_images", matched.get("n", float("nan")))
        rows.append({"key": r.key, "paper": r.paper, "table_or_figure": r.table_or_figure,
                     "description": r.description, "unit": r.unit, "paper_value": float(r.value),
                     "reproduced_value": reproduced, "difference": reproduced - float(r.value),
                     "dataset": dataset, "config": config_name, "n_images": n, "confidence": r.confidence,
                     "source_table": f"results/tables/{name}", "row_filter": r.row_filter, "column": r.column,
                     "status": status})
    return pd.DataFrame(rows)


def write_paper_vs_reproduced(tables_dir, csv_path, md_path, dataset: str, config_name: str = "") -> pd.DataFrame:
    """The stage of rule ``paper_vs_reproduced``: CSV + a Markdown table with a warning line when
    the reproduced values are not of CIFAR-10."""
    df = paper_vs_reproduced(tables_dir, dataset, config_name)
    from ..io import atomic_path, write_text

    with atomic_path(csv_path) as tmp:
        df.to_csv(tmp, index=False, float_format="%.6g")
    lines = [f"# Paper numbers vs reproduced values (config `{config_name}`, data set **{dataset}**)", ""]
    if dataset != "cifar10":
        lines += [f"**The reproduced values are of the {dataset} data set, not CIFAR-10**: they show that the "
                  "pipeline computes each quantity, not that the papers' numbers are reproduced.", ""]
    cols = ["key", "paper", "table_or_figure", "unit", "paper_value", "reproduced_value", "dataset", "confidence",
            "status"]
    lines.append("| " + " | ".join(cols) + " |")
    lines.append("|" + "---|" * len(cols))
    for _, r in df.iterrows():
        cells = [f"{r[c]:.4g}" if isinstance(r[c], float) else str(r[c]) for c in cols]
        lines.append("| " + " | ".join(c.replace("|", "/") for c in cells) + " |")
    write_text(md_path, "\n".join(lines) + "\n")
    return df
