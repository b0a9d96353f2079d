"""The claims table (dbprepro.claims) on synthetic run files: which claims a run can test, the
verdicts of planted effects, stable per-claim seeds, and the stage's files."""

import numpy as np
import pandas as pd
import pytest

from dbprepro.claims import RunData, apply_family, claims_table, stats, write_claims_table
from dbprepro.claims.paper1 import paper1_claims
from dbprepro.claims.paper2 import paper2_claims

DEFENSES = {"vanilla": dict(sampler="ddpm", finetune=None), "addt": dict(sampler="ddpm", finetune="addt"),
            "clean_finetune": dict(sampler="ddpm", finetune="clean_finetune")}


def _run(defense, setting, correct, attack="pgd", threat="linf", start=0):
    n = len(correct)
    return pd.DataFrame(dict(defense=defense, threat=threat, setting=setting, attack=attack,
                             id=np.arange(start, start + n), correct_single=np.asarray(correct, float)))


def _records(rng, n=128):
    """vanilla: 15 % under DW-box, 45 % under EOT; addt: 45 % under DW-box (a planted gain), 45 % EOT;
    clean_finetune = vanilla under DW-box (a planted null)."""
    dw = (rng.random(n) < 0.15).astype(float)
    return pd.concat([
        _run("vanilla", "dwbox", dw), _run("vanilla", "whitebox_eot", (rng.random(n) < 0.45)),
        _run("addt", "dwbox", np.maximum(dw, rng.random(n) < 0.35)), _run("addt", "whitebox_eot", rng.random(n) < 0.45),
        _run("clean_finetune", "dwbox", dw.copy()),
    ], ignore_index=True)


def test_planted_effects_get_their_verdicts():
    data = RunData(_records(np.random.default_rng(0)), pd.DataFrame(columns=["defense", "setting", "id", "correct"]))
    table = claims_table(paper1_claims(data, DEFENSES, resamples=300), data)
    v = table.set_index("claim_id")["verdict"]
    assert v["p1_dwbox_stronger_vanilla_linf"] == "holds"
    assert v["p1_addt_gain_addt_dwbox_linf"] == "holds"
    assert v["p1_ablation_clean_finetune_linf"] == "holds"  # addt > the planted copy of vanilla
    # addt: 45 % under both settings, a planted null whose row states the detectable effect
    row = table.set_index("claim_id").loc["p1_dwbox_stronger_addt_linf"]
    assert row["n"] == 128 and set(table["verdict"]) <= set(stats.VERDICTS)
    assert (table.loc[table.verdict == "not significant", "mde"] > 0).all()
    assert table.loc[table.verdict != "not significant", "mde"].isna().all()
    assert (table["ci_low"] <= table["estimate"]).all() and (table["estimate"] <= table["ci_high"]).all()


def test_a_claim_the_other_way_is_contradicted_and_absent_runs_give_no_row():
    rng = np.random.default_rng(1)
    n = 128
    worse = (rng.random(n) < 0.6).astype(float)
    rec = pd.concat([_run("vanilla", "dwbox", worse), _run("addt", "dwbox", worse * (rng.random(n) < 0.3))])
    data = RunData(rec, pd.DataFrame(columns=["defense", "setting", "id", "correct"]))
    table = claims_table(paper1_claims(data, DEFENSES, resamples=200), data)
    assert table["claim_id"].tolist() == ["p1_addt_gain_addt_dwbox_linf"]  # no EOT runs, no clean_finetune run
    assert table["verdict"].iloc[0] == "contradicted"


def test_paired_runs_compare_only_the_common_images():
    # a 256-image DW-box run against a 64-image EOT run: the first 64 images are compared
    dw = np.zeros(256)
    dw[64:] = 1.0  # images outside the EOT run must not enter
    rec = pd.concat([_run("vanilla", "dwbox", dw), _run("vanilla", "whitebox_eot", np.ones(64))])
    data = RunData(rec, pd.DataFrame(columns=["defense", "setting", "id", "correct"]))
    row = claims_table(paper1_claims(data, DEFENSES, resamples=200), data).iloc[0]
    assert row["n"] == 64 and row["value_a"] == 0.0 and row["estimate"] == -1.0


def test_a_rows_numbers_do_not_depend_on_the_other_rows():
    data = RunData(_records(np.random.default_rng(2)), pd.DataFrame(columns=["defense", "setting", "id", "correct"]))
    claims = paper1_claims(data, DEFENSES, resamples=300)
    full = claims_table(claims, data).set_index("claim_id")
    alone = claims_table([c for c in claims if c.claim_id == "p1_addt_gain_addt_dwbox_linf"], data).set_index(
        "claim_id")
    cols = ["estimate", "ci_low", "ci_high", "p_value"]
    assert full.loc["p1_addt_gain_addt_dwbox_linf", cols].tolist() == alone.loc["p1_addt_gain_addt_dwbox_linf",
                                                                                 cols].tolist()


def _p2_tables(rng, n=40):
    ids = np.arange(n)
    lp = pd.DataFrame(dict(id=np.repeat(ids, 2), adv_linf=0.2, adv_l2=1.0,
                           purified_adv_linf=0.5 + 0.05 * rng.standard_normal(2 * n),
                           purified_adv_l2=1.0 + 0.05 * rng.standard_normal(2 * n),
                           purified_clean_linf=0.4, purified_clean_l2=0.6))
    rnd = pd.DataFrame(dict(id=ids, corr_same_randomness=0.9, corr_different_randomness=0.2 + 0.01 * ids / n))
    cr = rng.random((n, 3))
    comp = pd.DataFrame(dict(defense="vanilla", id=np.repeat(ids, 3), config=np.tile([0, 1, 2], n),
                             cr=cr.ravel(), robust=(cr.ravel() < 0.3).astype(float)))
    models = pd.DataFrame(dict(defense=list("abcde"), config=0, mean_cr=[0.1, 0.2, 0.3, 0.4, 0.5],
                               robust_accuracy_dwbox=[0.5, 0.4, 0.3, 0.2, 0.1]))
    return {"p2_lp_distances": lp, "p2_randomness": rnd, "p2_compression": comp, "p2_compression_models": models}


def test_paper2_claims_on_planted_data():
    rng = np.random.default_rng(3)
    n = 40
    rec = pd.concat([_run("vanilla", "whitebox_eot", np.ones(n)), _run("vanilla", "dwbox", rng.random(n) < 0.2),
                     _run("vanilla", "dwbox_c1", rng.random(n) < 0.2)])
    data = RunData(rec, pd.DataFrame(), _p2_tables(rng, n))
    table = claims_table(paper2_claims(data, threat="linf", fixed_settings=["dwbox", "dwbox_c1"], n_images=None,
                                       resamples=300), data).set_index("claim_id")
    v = table["verdict"]
    assert v["p2_claim1_purified_adv_linf"] == "holds"
    assert v["p2_claim1_purified_adv_l2"] == "not significant"  # centred on ||x_adv - x||: a planted null
    assert v["p2_claim1_purified_clean_l2"] == "contradicted"   # 0.6 < 1.0
    assert v["p2_claim2_randomness"] == "holds"
    assert v["p2_claim3_fixed_randomness"] == "holds"
    assert v["p2_claim4_within"] == "holds" and table.loc["p2_claim4_within", "n"] == n  # images, not rows
    assert table.loc["p2_claim4_across", "p_value"] == pytest.approx(2 / 120)
    assert table.loc["p2_claim3_fixed_randomness", "n"] == n


def test_the_stage_writes_csv_and_markdown(tmp_path):
    rng = np.random.default_rng(4)
    paths = []
    for (d, s), df in _records(rng).groupby(["defense", "setting"]):
        p = tmp_path / f"{d}_{s}.parquet"
        df.to_parquet(p)
        paths.append(p)
    clean = []
    for d in ("addt", "vanilla"):
        folder = tmp_path / "evaluation" / d
        folder.mkdir(parents=True)
        pd.DataFrame(dict(setting="random", draw=0, id=np.arange(10), label=0, pred=0, correct=1.0)).to_parquet(
            folder / "clean_records.parquet")
        clean.append(folder / "clean_records.parquet")
    table = write_claims_table(paths, clean, {}, tmp_path / "claims.csv", tmp_path / "claims.md",
                               defenses=DEFENSES, threat="linf", fixed_settings=[], n_images=None, resamples=200)
    assert (tmp_path / "claims.md").read_text().count("| p1_") == len(table)
    written = pd.read_csv(tmp_path / "claims.csv")
    assert written["verdict"].tolist() == table["verdict"].tolist()
    tiny = table["p_value"] < 1e-4  # a small p keeps 3 significant digits in the file, never reads 0
    assert tiny.any() and (written.loc[tiny, "p_value"] > 0).all()
    assert written["p_value"].to_numpy() == pytest.approx(table["p_value"].to_numpy(), rel=1e-2)
    with pytest.raises(ValueError, match="no claim"):
        write_claims_table([], [], {}, tmp_path / "x.csv", tmp_path / "x.md", defenses={}, threat="linf",
                           fixed_settings=[], n_images=None)


def test_addt_under_adaptive_attacks_and_their_per_image_ensemble():
    from dbprepro.claims.adaptive import adaptive_claims

    rng = np.random.default_rng(7)
    n = 200
    van = {"dwbox": rng.random(n) < 0.3, "whitebox_eot": rng.random(n) < 0.4}
    rec = pd.concat([
        _run("vanilla", "dwbox", van["dwbox"]), _run("addt", "dwbox", np.maximum(van["dwbox"], rng.random(n) < 0.3)),
        _run("vanilla", "whitebox_eot", van["whitebox_eot"], attack="diffhammer"),
        _run("addt", "whitebox_eot", van["whitebox_eot"], attack="diffhammer"),  # no gain under DiffHammer
        _run("vanilla", "whitebox_eot", np.ones(n)), _run("addt", "whitebox_eot", np.ones(n)),
        _run("vanilla", "whitebox", np.zeros(n)),  # vanilla only: not in the ensemble (the sides face the same runs)
    ])
    data = RunData(rec, pd.DataFrame())
    table = claims_table(adaptive_claims(data, resamples=200), data).set_index("claim_id")
    # the fixed-randomness split has one run (DW-box PGD, its own row in paper1.py): no split row
    assert list(table.index) == ["p1_addt_gain_diffhammer_whitebox_eot_linf", "p1_addt_gain_ensemble_linf",
                                 "p1_addt_gain_ensemble_stochastic_linf"]
    assert table.loc["p1_addt_gain_diffhammer_whitebox_eot_linf", "estimate"] == 0.0
    # the ensemble: robust under dwbox AND diffhammer AND pgd-eot, per image
    expected_b = float((van["dwbox"] & van["whitebox_eot"]).mean())
    assert table.loc["p1_addt_gain_ensemble_linf", "value_b"] == pytest.approx(expected_b)
    assert table.loc["p1_addt_gain_ensemble_linf", "n"] == n
    # the stochastic split: diffhammer AND pgd-eot (vanilla survives pgd-eot everywhere here)
    assert table.loc["p1_addt_gain_ensemble_stochastic_linf", "value_b"] == pytest.approx(van["whitebox_eot"].mean())
    assert table.loc["p1_addt_gain_ensemble_stochastic_linf", "estimate"] == 0.0

    # a second fixed-randomness run makes the DW-box split: dwbox PGD AND dwbox DiffAttack
    da = rng.random(n) < 0.5
    rec2 = pd.concat([rec, _run("vanilla", "dwbox", da, attack="diffattack"),
                      _run("addt", "dwbox", np.ones(n), attack="diffattack")])
    data2 = RunData(rec2, pd.DataFrame())
    t2 = claims_table(adaptive_claims(data2, resamples=200), data2).set_index("claim_id")
    assert "p1_addt_gain_ensemble_dwbox_linf" in t2.index
    row = t2.loc["p1_addt_gain_ensemble_dwbox_linf"]
    assert row["value_b"] == pytest.approx(float((van["dwbox"] & da).mean()))
    assert "pgd dwbox" in row["note"] and "diffattack dwbox" in row["note"] and "diffhammer" not in row["note"]


def _planted_family(p_values, estimates, directions):
    n = len(p_values)
    return apply_family(pd.DataFrame(dict(
        claim_id=[f"c{i}" for i in range(n)], estimate=estimates, p_value=p_values, mde=np.full(n, 0.1),
        direction=directions)))


def test_levels_are_family_wise_raw_significance_alone_is_suggestive():
    # 40 tests; the first two have raw p < 0.05 but Holm's p (38 x 0.01, 37 x 0.03) > 0.05: suggestive, not holds
    p = np.r_[0.01, 0.03, 1e-5, 2e-4, np.full(36, 0.5)]
    est = np.r_[0.2, -0.2, 0.3, -0.3, np.full(36, 0.01)]
    table = _planted_family(p, est, np.ones(40, dtype=int)).set_index("claim_id")
    assert table.loc["c0", "p_holm"] == pytest.approx(0.38) and table.loc["c0", "verdict"] == "suggestive"
    assert table.loc["c1", "verdict"] == "suggestive"  # raw p < alpha against the claim is suggestive too
    assert table.loc["c2", "verdict"] == "holds"  # Holm p = 40 x 1e-5 < 0.05, in the claimed direction
    assert table.loc["c3", "verdict"] == "contradicted"  # Holm p = 39 x 2e-4 < 0.05, against it
    assert (table["verdict"].iloc[4:] == "not significant").all()
    # mde only where nothing was seen
    assert table.loc[table.verdict == "not significant", "mde"].notna().all()
    assert table.loc[table.verdict != "not significant", "mde"].isna().all()


def test_a_single_test_family_reads_as_its_raw_verdict():
    table = _planted_family([0.01], [-0.2], [-1])
    assert table["p_holm"].iloc[0] == pytest.approx(0.01) and table["verdict"].iloc[0] == "holds"
    assert stats.family_verdict(0.2, 0.01, float("nan"), 1) == "suggestive"  # no adjusted p: never family-wise
    assert stats.family_verdict(0.0, 0.0, 0.0, 1) == "not significant"
    with pytest.raises(ValueError):
        stats.family_verdict(0.2, 0.01, 0.01, 0)
