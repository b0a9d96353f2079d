"""dbprepro.reference: the papers' numbers joined to reproduced tables (fabricated here)."""

from __future__ import annotations

import math

import pandas as pd
import pytest

from dbprepro.reference import (COLUMNS, load_paper_numbers, lookup, paper_vs_reproduced,
                                write_paper_vs_reproduced)


def main_table(tmp_path, vanilla_dwbox=0.25):
    rows = []
    for d, s, acc in (("vanilla", "dwbox", vanilla_dwbox), ("vanilla", "whitebox_eot", 0.5),
                      ("addt", "dwbox", 0.375)):
        for ev, a in (("single", acc), ("mean", acc + 0.01)):
            rows.append({"defense": d, "threat": "linf", "norm": "linf", "eps": 0.2, "setting": s, "attack": "pgd",
                         "evaluation": ev, "n_images": 64, "robust_accuracy": a})
    pd.DataFrame(rows).to_csv(tmp_path / "p1_table_main.csv", index=False)


def test_shipped_reference_is_complete_and_points_at_real_tables():
    ref = load_paper_numbers()
    assert tuple(ref.columns) == COLUMNS
    keys = set(ref["key"])
    assert {"p1_vanilla_dwbox_linf", "p1_vanilla_eot_linf", "p1_addt_dwbox_linf", "p1_addt_eot_linf",
            "p2_fixed_gain_cifar10", "p2_corr_same_randomness", "p2_corr_different_randomness"} <= keys
    got = ref.set_index("key")["value"]
    assert (got["p1_vanilla_dwbox_linf"], got["p1_vanilla_eot_linf"]) == (16.8, 47.27)
    assert (got["p1_addt_dwbox_linf"], got["p1_addt_eot_linf"]) == (39.16, 51.46)
    assert got["p2_corr_same_randomness"] == 0.9954 and got["p2_corr_different_randomness"] == 0.2368
    assert ref["confidence"].str.len().min() > 5 and ref["reproduced_table"].str.endswith(".csv").all()


def test_join_picks_the_one_matching_row_and_scales(tmp_path):
    main_table(tmp_path)
    df = paper_vs_reproduced(tmp_path, "digits", "digits").set_index("key")
    assert df.loc["p1_vanilla_dwbox_linf", "reproduced_value"] == pytest.approx(25.0)  # single, not mean
    assert df.loc["p1_vanilla_eot_linf", "reproduced_value"] == pytest.approx(50.0)
    assert df.loc["p1_addt_dwbox_linf", "reproduced_value"] == pytest.approx(37.5)
    assert df.loc["p1_vanilla_dwbox_linf", "difference"] == pytest.approx(25.0 - 16.8)
    assert df.loc["p1_vanilla_dwbox_linf", "n_images"] == 64
    assert (df["dataset"] == "digits").all() and df.loc["p1_vanilla_dwbox_linf", "status"] == "ok"


def test_missing_values_are_nan_not_errors(tmp_path):
    main_table(tmp_path)  # no ADDT whitebox_eot row, and no paper-2 tables at all
    df = paper_vs_reproduced(tmp_path, "cifar10").set_index("key")
    assert math.isnan(df.loc["p1_addt_eot_linf", "reproduced_value"])
    assert df.loc["p1_addt_eot_linf", "status"] == "no matching row"
    assert math.isnan(df.loc["p2_corr_same_randomness", "reproduced_value"])
    assert df.loc["p2_corr_same_randomness", "status"] == "table p2_randomness_summary.csv not built"
    assert df.loc["p2_corr_same_randomness", "paper_value"] == 0.9954


def test_paper2_tables(tmp_path):
    pd.DataFrame({"row": ["undefended", "random", "fixed_c0", "fixed_mean"], "gain_points": [0.0, 32.8, 21.9, 20.0],
                  "n_images": [64] * 4}).to_csv(tmp_path / "p2_table_fixed_randomness.csv", index=False)
    pd.DataFrame({"setting": ["same_randomness", "different_randomness"], "mean": [0.887, 0.223]}).to_csv(
        tmp_path / "p2_randomness_summary.csv", index=False)
    pd.DataFrame({"pair": ["adv", "adv", "purified_adv"], "norm": ["l2", "linf", "l2"], "mean": [1.2, 0.03, 3.0],
                  "n": [64, 64, 64]}).to_csv(tmp_path / "p2_lp_distances_summary.csv", index=False)
    df = paper_vs_reproduced(tmp_path, "digits").set_index("key")
    assert df.loc["p2_fixed_gain_cifar10", "reproduced_value"] == 20.0
    assert df.loc["p2_random_gain_prior", "reproduced_value"] == 32.8
    assert df.loc["p2_corr_different_randomness", "reproduced_value"] == 0.223
    assert df.loc["p2_adv_l2", "reproduced_value"] == 1.2 and df.loc["p2_adv_linf", "reproduced_value"] == 0.03
    assert math.isnan(df.loc["p1_vanilla_dwbox_linf", "reproduced_value"])


def test_lookup_edge_cases():
    t = pd.DataFrame({"a": [1, 2, 2], "b": ["x", "y", "z"], "v": [0.1, float("nan"), 0.3]})
    assert lookup(t, "a=1", "v")[0] == 0.1
    assert lookup(t, "a=2;b=z", "v")[0] == 0.3
    assert lookup(t, "a=2;b=y", "v")[1] == "value is NaN"
    assert lookup(t, "c=1", "v")[1] == "no column 'c'"
    assert lookup(t, "a=1", "w")[1] == "no column 'w'"
    with pytest.raises(ValueError, match="matches 2 rows"):
        lookup(t, "a=2", "v")
    with pytest.raises(ValueError, match="column=value"):
        lookup(t, "a", "v")


def test_markdown_flags_non_cifar_values(tmp_path):
    main_table(tmp_path)
    write_paper_vs_reproduced(tmp_path, tmp_path / "out.csv", tmp_path / "out.md", "digits", "digits")
    md = (tmp_path / "out.md").read_text()
    assert "not CIFAR-10" in md and "p1_vanilla_dwbox_linf" in md
    write_paper_vs_reproduced(tmp_path, tmp_path / "c.csv", tmp_path / "c.md", "cifar10", "cifar10")
    assert "not CIFAR-10" not in (tmp_path / "c.md").read_text()
    out = pd.read_csv(tmp_path / "out.csv")
    assert len(out) == len(load_paper_numbers()) and set(out["dataset"]) == {"digits"}
