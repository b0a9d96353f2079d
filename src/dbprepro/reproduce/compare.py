"""Compare a recorded run with a new one: tables, attack runs, claims (:func:`compare_runs`).

A run is given as its ``results/`` folder (``tables/`` and ``attacks/`` inside), the folder that
holds ``results/`` (a Snakemake working directory), a ``tables`` folder inside ``results/`` (its
``attacks/`` sibling is used), or a flat folder of tables such as ``docs/results_tables`` (no
per-image records: the attack runs are then not compared).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from .claims import CLAIMS, ClaimComparison, compare_claims
from .records import RunComparison, compare_attack_runs
from .tables import TableComparison, compare_tables
from .tolerance import FAILING, ONLY_NEW, ONLY_RECORDED, Tolerance

log = logging.getLogger("dbprepro.reproduce")


@dataclass(frozen=True)
class RunTree:
    """Where one run's tables and (if any) per-image attack records are."""

    path: Path
    tables: Path
    attacks: Path | None

    @classmethod
    def locate(cls, path) -> RunTree:
        p = Path(path)
        if not p.is_dir():
            raise FileNotFoundError(f"{p}: no such folder (a results/ folder or a folder of tables)")
        for root in (p, p / "results"):
            if (root / "tables").is_dir():
                return cls(p, root / "tables", root / "attacks" if (root / "attacks").is_dir() else None)
        if any(p.glob("*.csv")):
            sibling = p.parent / "attacks"
            return cls(p, p, sibling if p.name == "tables" and sibling.is_dir() else None)
        raise FileNotFoundError(f"{p}: neither a results/ folder (tables/, attacks/) nor a folder of CSV tables")


def resolve_recorded(path, base) -> str:
    """``reproduction.recorded`` as a path: relative paths are relative to ``base`` (the repository)."""
    p = Path(path)
    return str(p if p.is_absolute() else Path(base) / p)


def has_attack_records(path) -> bool:
    """Whether the run at ``path`` has per-image attack records (False for a folder of tables or
    for no run at all: then Snakemake names the missing input)."""
    try:
        return RunTree.locate(path).attacks is not None
    except FileNotFoundError:
        return False


@dataclass
class Comparison:
    """Everything :func:`compare_runs` found; ``ok`` when the runs agree within noise."""

    recorded: RunTree
    new: RunTree
    tolerance: Tolerance
    tables: list[TableComparison] = field(default_factory=list)
    runs: list[RunComparison] = field(default_factory=list)
    claims: list[ClaimComparison] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def items(self):
        """(section, name, status) of every compared item."""
        yield from (("table", t.name, t.status) for t in self.tables)
        yield from (("attack run", r.run, r.status) for r in self.runs)
        yield from (("claim", c.claim_id, c.status) for c in self.claims)

    @property
    def failures(self) -> list[tuple[str, str, str]]:
        return [item for item in self.items() if item[2] in FAILING]

    @property
    def ok(self) -> bool:
        return not self.failures

    @property
    def all_identical(self) -> bool:
        return all(status == "identical" for *_, status in self.items())

    @property
    def verdict(self) -> str:
        if self.all_identical:
            return "identical"
        return "reproduced within noise" if self.ok else "NOT reproduced within noise"


def compare_runs(recorded, new, tolerance: Tolerance | None = None) -> Comparison:
    """Compare the run at ``recorded`` with the run at ``new`` (see the module docstring for the
    accepted folders and :mod:`dbprepro.reproduce` for the rules)."""
    tol = tolerance or Tolerance()
    a, b = RunTree.locate(recorded), RunTree.locate(new)
    cmp = Comparison(a, b, tol)
    log.info("comparing tables: %s (recorded) with %s (new)", a.tables, b.tables)
    cmp.tables = compare_tables(a.tables, b.tables, tol)
    if a.attacks is not None and b.attacks is not None:
        log.info("comparing per-image attack records: %s with %s", a.attacks, b.attacks)
        cmp.runs = compare_attack_runs(a.attacks, b.attacks, tol)
    else:
        which = " and ".join(name for name, t in (("recorded", a), ("new", b)) if t.attacks is None)
        cmp.notes.append(f"attack runs not compared: no per-image records (attacks/) in the {which} run")
    ca, cb = a.tables / CLAIMS, b.tables / CLAIMS
    if ca.is_file() and cb.is_file():
        log.info("comparing claims")
        cmp.claims, notes = compare_claims(ca, cb, tol)
        cmp.notes += notes
    elif ca.is_file() or cb.is_file():
        missing = "new" if ca.is_file() else "recorded"
        cmp.notes.append(f"claims not compared: no {CLAIMS} in the {missing} run")
        if missing == "new":
            cmp.tables.append(TableComparison(CLAIMS, ONLY_RECORDED, notes=["the new run has no claims table"]))
    for section, name, status in cmp.items():
        if status in FAILING:
            log.warning("%s %s: %s", section, name, status)
        elif status == ONLY_NEW:
            log.info("%s %s: %s", section, name, status)
    log.info("result: %s (%d failing of %d compared)", cmp.verdict, len(cmp.failures), len(list(cmp.items())))
    return cmp
