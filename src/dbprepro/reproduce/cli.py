"""``dbprepro compare-runs RECORDED NEW``: the reproduction check on the command line (registered
by :func:`add_compare_command` in :mod:`dbprepro.cli`)."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from .tolerance import Tolerance

_DEFAULT = Tolerance()


def tolerance_from_args(args: argparse.Namespace) -> Tolerance:
    return Tolerance(atol=args.atol, rtol=args.rtol, flip_images=args.flip_images, flip_share=args.flip_share,
                     alpha=args.alpha)


def _cmd_compare_runs(args: argparse.Namespace) -> int:
    from .compare import compare_runs
    from .report import why, write_reports

    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    logger = logging.getLogger("dbprepro.reproduce")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO if not args.quiet else logging.WARNING)
    try:
        cmp = compare_runs(args.recorded, args.new, tolerance_from_args(args))
    finally:
        logger.removeHandler(handler)
    out = Path(args.out)
    write_reports(cmp, out / "compare.csv", out / "compare.md", out / "compare_cells.csv", level=args.heading_level)
    print(f"{cmp.verdict}: {len(cmp.failures)} of {len(list(cmp.items()))} compared items beyond noise; "
          f"reports in {out}/compare.md, compare.csv, compare_cells.csv")
    for section, name, status in cmp.failures:
        print(f"  {section} {name}: {status}{why(cmp, section, name)}")
    if args.describe:
        write_about(out / "about.json", args.recorded, args.new, args.describe, cmp.verdict)
    return 0 if cmp.ok else 1


def write_about(path: Path, recorded: str, new: str, description: str, verdict: str) -> dict:
    """What a kept comparison compared (for ``docs/reproduction``, which the results doc shows only
    while the DVC hash of the recorded run's tables is the one ``dvc.lock`` records): that hash,
    the new run's, the description of the new run and the check's verdict."""
    import json

    from ..io import write_text
    from ..results_doc import tables_hash

    def tables(run: str) -> Path:
        return Path(run) / "tables" if (Path(run) / "tables").is_dir() else Path(run)

    about = dict(recorded_tables_hash=tables_hash(tables(recorded)), new_tables_hash=tables_hash(tables(new)),
                 new_run=description, verdict=verdict)
    write_text(path, json.dumps(about, indent=1, sort_keys=True) + "\n")
    return about


def add_compare_command(sub) -> None:
    c = sub.add_parser("compare-runs", help="reproduction check: do two runs' tables, per-image attack outcomes "
                                            "and claims agree within noise? exit 0 if so, 1 otherwise")
    c.add_argument("recorded", help="the recorded run: a results/ folder (tables/, attacks/) or a folder of tables "
                                    "such as docs/results_tables")
    c.add_argument("new", help="the new run, the same kinds of folder (e.g. results)")
    c.add_argument("--out", default="results/compare-runs",
                   help="folder of compare.md, compare.csv and compare_cells.csv [%(default)s]")
    c.add_argument("--atol", type=float, default=_DEFAULT.atol,
                   help="table numbers: absolute part of |new - recorded| <= atol + rtol |recorded| [%(default)s]")
    c.add_argument("--rtol", type=float, default=_DEFAULT.rtol, help="table numbers: relative part [%(default)s]")
    c.add_argument("--flip-images", type=int, default=_DEFAULT.flip_images,
                   help="images whose outcome may flip in any attack run (and by which a share of n images in a "
                        "table may move) [%(default)s]")
    c.add_argument("--flip-share", type=float, default=_DEFAULT.flip_share,
                   help="... or this share of the run's images, whichever is larger [%(default)s]")
    c.add_argument("--alpha", type=float, default=_DEFAULT.alpha,
                   help="p-value columns must stay on the same side of alpha; level of recomputed verdicts "
                        "(a claims table's own alpha column wins) [%(default)s]")
    c.add_argument("--heading-level", type=int, default=3, choices=range(1, 7),
                   help="Markdown level of the report's section headings (to include it in a document) "
                        "[%(default)s]")
    c.add_argument("--quiet", action="store_true", help="log only the items beyond noise")
    c.add_argument("--describe", help="also write about.json beside the reports: this description of the new run "
                                      "(e.g. its commit and thread count) and both runs' tables hashes, to keep "
                                      "the comparison in docs/reproduction for the results doc")
    c.set_defaults(func=_cmd_compare_runs)
