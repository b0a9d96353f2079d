"""The reproduction check (dbprepro.reproduce, ``dbprepro compare-runs``) on synthetic runs with
planted differences: what must pass within noise passes, what moved beyond it fails and is named."""

import shutil

import numpy as np
import pandas as pd
import pytest

from dbprepro.cli import main
from dbprepro.reproduce import Tolerance, compare_runs
from dbprepro.reproduce.tables import key_columns
from dbprepro.reproduce.tolerance import DIFFERENT, IDENTICAL, WITHIN, Shape, ci_groups, compare_cell

RUN = "vanilla/linf/dwbox/pgd"


def _claims() -> pd.DataFrame:
    """Three claims in the family-wise format: holds (Holm p < alpha), suggestive (raw p only),
    not significant."""
    return pd.DataFrame({
        "claim_id": ["c_holds", "c_suggestive", "c_null"],
        "estimate": [0.20, 0.08, 0.01], "ci_low": [0.12, 0.01, -0.05], "ci_high": [0.28, 0.15, 0.07],
        "p_value": [0.001, 0.03, 0.6], "p_holm": [0.003, 0.06, 0.6], "n": [256, 256, 256],
        "mde": [np.nan, np.nan, 0.09], "alpha": [0.05] * 3, "direction": [1, 1, 1],
        "verdict": ["holds", "suggestive", "not significant"],
        "verdict_raw": ["holds", "holds", "not significant"]})


def _main_table() -> pd.DataFrame:
    return pd.DataFrame({
        "defense": ["vanilla", "vanilla", "addt"], "threat": ["linf"] * 3, "eps": [0.2] * 3,
        "setting": ["dwbox", "whitebox_eot", "dwbox"], "attack": ["pgd"] * 3, "n_images": [256, 64, 256],
        "robust_accuracy": [64 / 256, 22 / 64, 87 / 256], "ci_low": [0.2045, 0.2392, 0.2846],
        "ci_high": [0.3106, 0.4660, 0.3999], "mean_l2": [1.3183, 1.2750, 1.3001]})


def _records(n: int = 256, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    ok = (rng.random(n) < 0.25).astype(np.float64)
    return pd.DataFrame({"defense": "vanilla", "threat": "linf", "setting": "dwbox", "attack": "pgd",
                         "id": np.arange(n) * 3 + 1, "label": rng.integers(0, 10, n), "correct_single": ok,
                         "correct_mean": ok, "correct_worst": ok, "correct_vote": ok,
                         "norm_linf": np.full(n, 0.2), "loss_end": rng.random(n)})


def _write_run(root, claims=None, main=None, records=None):
    tables, run = root / "results" / "tables", root / "results" / "attacks" / RUN
    tables.mkdir(parents=True)
    run.mkdir(parents=True)
    (_claims() if claims is None else claims).to_csv(tables / "claims.csv", index=False, float_format="%.4f")
    (_main_table() if main is None else main).to_csv(tables / "p1_table_main.csv", index=False, float_format="%.4f")
    (_records() if records is None else records).to_parquet(run / "records.parquet")
    return root / "results"


@pytest.fixture
def recorded(tmp_path):
    return _write_run(tmp_path / "recorded")


def _compare(recorded, new, *extra):
    return main(["compare-runs", str(recorded), str(new), "--out", str(new.parent / "report"), "--quiet", *extra])


def test_identical_runs_pass_as_identical(recorded, tmp_path, capsys):
    new = _write_run(tmp_path / "new")
    assert _compare(recorded, new) == 0
    assert capsys.readouterr().out.startswith("identical:")
    report = pd.read_csv(new.parent / "report" / "compare.csv")
    assert set(report["section"]) == {"table", "attack run", "claim"}
    assert report["status"].eq(IDENTICAL).all()
    assert (new.parent / "report" / "compare.md").read_text().startswith("**Identical.**")


def test_a_changed_verdict_fails_and_is_named(recorded, tmp_path, capsys):
    claims = _claims()
    claims.loc[1, ["p_holm", "verdict"]] = [0.04, "holds"]  # suggestive -> holds, same estimate
    new = _write_run(tmp_path / "new", claims=claims)
    assert _compare(recorded, new) == 1
    out = capsys.readouterr().out
    assert "claim c_suggestive: different" in out and "c_holds" not in out
    md = (new.parent / "report" / "compare.md").read_text()
    assert "NOT reproduced within noise" in md and "verdict suggestive -> holds" in md


def test_an_estimate_outside_the_other_interval_fails(recorded, tmp_path):
    claims = _claims()
    claims.loc[0, ["estimate", "ci_low", "ci_high"]] = [0.30, 0.22, 0.38]  # recorded 0.20 below 0.22
    cmp = compare_runs(recorded, _write_run(tmp_path / "new", claims=claims))
    assert [f[1] for f in cmp.failures] == ["c_holds"]
    claims.loc[0, ["estimate", "ci_low", "ci_high"]] = [0.22, 0.14, 0.30]  # each inside the other's CI
    cmp = compare_runs(recorded, _write_run(tmp_path / "new2", claims=claims))
    assert cmp.ok and {c.claim_id: c.status for c in cmp.claims}["c_holds"] == WITHIN


def test_one_flipped_image_of_256_is_within_noise(recorded, tmp_path):
    records = _records()
    records.loc[7, ["correct_single", "correct_mean", "correct_worst", "correct_vote"]] = \
        1 - records.loc[7, "correct_single"]
    cmp = compare_runs(recorded, _write_run(tmp_path / "new", records=records))
    (run,) = cmp.runs
    assert cmp.ok and run.status == WITHIN
    assert run.flips["correct_single"] == 1 and run.share == pytest.approx(1 / 256)
    # the allowance is configurable: with none, the same flip fails
    strict = compare_runs(recorded, tmp_path / "new" / "results", Tolerance(flip_images=0, flip_share=0))
    assert not strict.ok and strict.failures == [("attack run", RUN, DIFFERENT)]


def test_many_flipped_images_fail_and_the_run_is_named(recorded, tmp_path, capsys):
    records = _records()
    records.loc[:39, "correct_single"] = 1 - records.loc[:39, "correct_single"]  # 40 of 256 > 2 % of 256
    new = _write_run(tmp_path / "new", records=records)
    assert _compare(recorded, new) == 1
    assert f"attack run {RUN}: different" in capsys.readouterr().out
    md = (new.parent / "report" / "compare.md").read_text()
    assert "flipped correct_single 40" in md


def test_records_that_differ_only_in_losses_are_within_tolerance(recorded, tmp_path):
    records = _records()
    records["loss_end"] += 1e-6
    (run,) = compare_runs(recorded, _write_run(tmp_path / "new", records=records)).runs
    assert run.status == WITHIN and sum(run.flips.values()) == 0


def test_a_table_row_beyond_tolerance_fails_and_is_named(recorded, tmp_path):
    table = _main_table()
    table.loc[2, "robust_accuracy"] = 0.55  # 87/256 -> 0.55: far outside its CI, 54 images
    cmp = compare_runs(recorded, _write_run(tmp_path / "new", main=table))
    assert cmp.failures == [("table", "p1_table_main.csv", DIFFERENT)]
    (t,) = cmp.tables
    assert t.key == ["defense", "threat", "setting"] and t.different == 1 and t.identical == 2
    assert t.diffs[0].key == "defense=addt, threat=linf, setting=dwbox"
    assert "robust_accuracy" in t.diffs[0].describe()


def test_a_table_row_within_its_interval_or_a_few_images_passes(recorded, tmp_path):
    table = _main_table()
    table.loc[0, "robust_accuracy"] = 67 / 256  # 3 images of 256: within the CI half-width
    table.loc[1, "robust_accuracy"] = 23 / 64  # 1 image of 64
    table.loc[2, "mean_l2"] = 1.3101  # relative change < rtol
    cmp = compare_runs(recorded, _write_run(tmp_path / "new", main=table))
    (t,) = cmp.tables
    assert cmp.ok and t.status == WITHIN and t.within == 3 and t.different == 0


def test_rows_only_in_one_run_are_different_and_named(recorded, tmp_path):
    cmp = compare_runs(recorded, _write_run(tmp_path / "new", main=_main_table().iloc[:2]))
    (t,) = cmp.tables
    assert not cmp.ok and [d.describe() for d in t.diffs] == [
        "defense=addt, threat=linf, setting=dwbox (only in recorded)"]


def test_an_old_claims_table_is_compared_by_recomputed_family_wise_verdicts(recorded, tmp_path):
    """A claims.csv written before the family-wise levels: no verdict_raw or direction, and its
    verdict read the raw p-value (c_suggestive said 'holds')."""
    old = _claims().drop(columns=["verdict_raw", "direction"])
    old["verdict"] = ["holds", "holds", "not significant"]
    old_run = _write_run(tmp_path / "old", claims=old)
    cmp = compare_runs(old_run, recorded)
    assert cmp.ok, cmp.failures
    assert [c.recorded["verdict"] for c in cmp.claims] == ["holds", "suggestive", "not significant"]
    assert {c.status for c in cmp.claims} == {WITHIN}  # same numbers, but not the recorded table bit for bit
    assert any("recomputed" in n for n in cmp.notes)
    # a recorded Holm p below alpha recomputes to holds, which the new suggestive contradicts
    old.loc[1, "p_holm"] = 0.04
    cmp = compare_runs(_write_run(tmp_path / "old2", claims=old), recorded)
    assert cmp.failures == [("claim", "c_suggestive", DIFFERENT)]


def test_a_flat_tables_folder_compares_tables_and_claims_only(recorded, tmp_path):
    flat = tmp_path / "results_tables"
    shutil.copytree(recorded / "tables", flat)
    cmp = compare_runs(flat, recorded)
    assert cmp.all_identical and not cmp.runs and len(cmp.tables) == 1 and len(cmp.claims) == 3
    assert any("attack runs not compared" in n for n in cmp.notes)


def test_a_table_only_the_new_run_has_is_a_note_one_only_recorded_fails(recorded, tmp_path):
    new = _write_run(tmp_path / "new")
    _main_table().to_csv(new / "tables" / "extra.csv", index=False)
    assert compare_runs(recorded, new).ok
    assert not compare_runs(new, recorded).ok


def test_cell_rules():
    cols = ["defense", "n_images", "robust_accuracy", "ci_low", "ci_high", "p_value", "detail"]
    groups = ci_groups(cols)
    assert groups["robust_accuracy"] == groups["ci_high"] == ("ci_low", "ci_high") and "n_images" not in groups
    assert ci_groups(["robust_dwbox", "ci_low_dwbox", "ci_high_dwbox"])["robust_dwbox"] == ("ci_low_dwbox",
                                                                                             "ci_high_dwbox")
    row = dict(defense="v", n_images=64, robust_accuracy=0.5, ci_low=0.48, ci_high=0.52)
    tol = Tolerance(atol=0, rtol=0)
    shape = Shape(cols, groups)

    def cell(col, a, b):
        return compare_cell(col, a, b, row, row, shape, tol)[0]

    assert cell("robust_accuracy", 0.5, 0.5) == IDENTICAL
    assert cell("robust_accuracy", 0.5, 0.52) == WITHIN  # the CI half-width
    assert cell("robust_accuracy", 32 / 64, 34 / 64) == WITHIN  # 2 images of 64
    assert cell("robust_accuracy", 32 / 64, 35 / 64) == DIFFERENT
    assert cell("robust_accuracy", 0.4531, 0.4844) == WITHIN  # 29/64 -> 31/64 as written: 2 images
    assert cell("ci_low", 0.48, 0.40) == DIFFERENT  # an interval's bound beyond its half-width
    assert cell("p_value", 0.01, 0.04) == WITHIN and cell("p_value", 0.04, 0.06) == DIFFERENT
    assert cell("detail", "x1: 0.50 of 64", "x1: 0.50 of 64 images") == DIFFERENT
    assert compare_cell("detail", "a 0.5000", "a 0.5001", row, row, shape, Tolerance())[0] == WITHIN
    assert cell("defense", "v", "w") == DIFFERENT
    with pytest.raises(ValueError, match="flip_images"):
        Tolerance(flip_images=-1)


def test_key_columns_skip_floats_and_stop_when_unique():
    t = _main_table()
    assert key_columns(t, t) == (["defense", "threat", "setting"], True)
    dup = pd.concat([t, t.iloc[:1]], ignore_index=True)
    key, unique = key_columns(dup, dup)
    assert not unique and key == ["defense", "threat", "setting", "attack", "n_images"]


def _stage_io(recorded, new, fail):
    from types import SimpleNamespace

    out = new / "reproduction"
    output = SimpleNamespace(csv=str(out / "compare.csv"), md=str(out / "compare.md"),
                             cells=str(out / "compare_cells.csv"))
    params = SimpleNamespace(tolerance=dict(atol=0.01, rtol=0.05, flip_images=2, flip_share=0.02, fail=fail),
                             alpha=0.05)
    return SimpleNamespace(recorded=str(recorded)), output, params


def test_the_compare_runs_stage_writes_the_reports_and_fails_beyond_noise(recorded, tmp_path):
    """The rule compare_runs (workflow/rules/reproduce.smk): the run is results/ above its output."""
    from dbprepro.pipeline.reproduce import compare_runs as stage

    new = _write_run(tmp_path / "new")
    stage(*_stage_io(recorded, new, fail=True), {})
    assert (new / "reproduction" / "compare.md").read_text().startswith("**Identical.**")
    claims = _claims()
    claims.loc[2, ["p_value", "p_holm", "verdict"]] = [0.001, 0.002, "holds"]
    moved = _write_run(tmp_path / "moved", claims=claims)
    with pytest.raises(RuntimeError, match="c_null: different"):
        stage(*_stage_io(recorded, moved, fail=True), {})
    stage(*_stage_io(recorded, moved, fail=False), {})
    assert "NOT reproduced" in (moved / "reproduction" / "compare.md").read_text()


def test_the_config_defaults_are_the_command_defaults():
    """reproduction.* in the schema and dbprepro compare-runs' defaults are one tolerance."""
    from dbprepro.config import load_configs

    from pathlib import Path

    cfg = load_configs([Path(__file__).resolve().parents[1] / "config.yaml"])["reproduction"]
    default = Tolerance()
    assert {k: cfg[k] for k in ("atol", "rtol", "flip_images", "flip_share")} == {
        k: getattr(default, k) for k in ("atol", "rtol", "flip_images", "flip_share")}
    assert cfg["recorded"] == "docs/results_tables" and cfg["fail"] is True


def test_signed_columns_take_their_scale_and_counts_move_by_images():
    """A difference near 0 moves at the scale of its column; a count of images (waterfall's
    removed) by the images an attack run may flip; an accuracy 0 -> 1 is no count."""
    cols = ["key", "n_images", "difference", "removed", "accuracy"]
    shape = Shape.of(cols, {"key": ["a", "b"], "n_images": [24, 24], "difference": [-12.0, 0.4],
                            "removed": [14, 0], "accuracy": [0.0, 1.0]})
    assert shape.scales == {"difference": 12.0} and shape.counts == {"removed", "n_images"}
    row = dict(key="b", n_images=24, difference=0.4, removed=14, accuracy=0.0)
    tol = Tolerance()  # 0.01 + 0.05 x 12 = 0.61 for the signed column
    assert compare_cell("difference", 0.4, 0.9, row, row, shape, tol) == (WITHIN, "atol/rtol")
    assert compare_cell("difference", 0.4, 1.2, row, row, shape, tol)[0] == DIFFERENT
    assert compare_cell("removed", 14, 16, row, row, shape, tol) == (WITHIN, "images")
    assert compare_cell("removed", 14, 17, row, row, shape, tol)[0] == DIFFERENT
    assert compare_cell("accuracy", 0.0, 1.0, row, row, shape, tol)[0] == DIFFERENT
