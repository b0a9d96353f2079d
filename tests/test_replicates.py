"""Claims across replicate training seeds (dbprepro.claims.replicates): the combined test's size
and power on simulated seeds that share their images, the table, the config checks."""

import numpy as np
import pandas as pd
import pytest
from scipy import stats as sps

from dbprepro.claims import replicates as rep
from dbprepro.config import load_configs
from dbprepro.errors import ConfigError
from dbprepro.pipeline import stage_name
from dbprepro.runtime import provenance_path
from smoke import ROOT

ALPHA = 0.05


def _simulate(rng, reps, k, n, sd_image, sd_seed_image, tau, theta):
    """``reps`` experiments of ``k`` seeds attacking the SAME ``n`` images: per-image score
    theta + b_s (seed, sd tau) + u_i (image, shared by the seeds) + v_si (seed x image); each seed
    reports its mean and a 95 % normal interval, as claims.csv does."""
    x = (theta + rng.normal(0, tau, (reps, k, 1)) + rng.normal(0, sd_image, (reps, 1, n))
         + rng.normal(0, sd_seed_image, (reps, k, n)))
    est = x.mean(-1)
    half = sps.norm.ppf(0.975) * x.std(-1, ddof=1) / np.sqrt(n)
    return est, rep.se_from_ci(est - half, est + half, 0.95)


def test_combined_test_keeps_its_size_with_shared_images_and_detects_a_shared_effect():
    rng = np.random.default_rng(24)
    reps, n = 2000, 64
    bound = ALPHA + 3 * np.sqrt(ALPHA * (1 - ALPHA) / reps)
    # (k, per-image sd of the shared image effect, of the seed x image effect, sd of the seed effect)
    regimes = {"images dominate": (3, 1.0, 0.3, 0.0), "seeds dominate": (3, 0.2, 0.2, 0.15),
               "both": (3, 1.0, 0.05, 0.3), "seeds only": (3, 0.05, 0.05, 0.3), "two seeds": (2, 0.2, 0.2, 0.15),
               "two seeds, images": (2, 1.0, 0.3, 0.0)}
    for name, (k, su, sv, tau) in regimes.items():
        est, se = _simulate(rng, reps, k, n, su, sv, tau, 0.0)
        rate = float((rep.combine_seeds(est, se, n)["p_value"] < ALPHA).mean())
        assert rate <= bound, f"{name}: the combined test rejects {rate:.3f} of nulls (bound {bound:.3f})"
    # the same design breaks poolings that treat the seeds as independent: the image sample's tilt,
    # shared by every seed, is invisible to the seeds' spread (Hartung-Knapp, equal weights) and
    # divided by k under inverse-variance weights
    est, se = _simulate(rng, reps, 3, n, 1.0, 0.3, 0.0, 0.0)
    hk = 2 * sps.t.sf(np.abs(est.mean(-1)) / np.sqrt(est.var(-1, ddof=1) / 3), 2)
    fixed = 2 * sps.norm.sf(np.abs(est.mean(-1)) / np.sqrt((se**2).mean(-1) / 3))
    assert (hk < ALPHA).mean() > 3 * bound and (fixed < ALPHA).mean() > 3 * bound
    # a planted effect shared by every seed: 3 image SEs of one seed (sd sqrt(1.09) / 8 = 0.13)
    est, se = _simulate(rng, reps, 3, n, 1.0, 0.3, 0.0, 0.4)
    res = rep.combine_seeds(est, se, n)
    assert (res["p_value"] < ALPHA).mean() >= 0.8
    assert abs(res["estimate"].mean() - 0.4) < 0.01  # the mean over seeds is unbiased


def test_combined_test_reduces_to_known_cases():
    # one seed's interval +-1.96 is an SE of 1
    assert rep.se_from_ci(-1.959964, 1.959964, 0.95) == pytest.approx(1.0, rel=1e-6)
    # identical seeds (no spread): the image term alone, with n - 1 degrees of freedom
    res = rep.combine_seeds([0.3, 0.3, 0.3], [0.1, 0.1, 0.1], 64)
    assert res["se"] == pytest.approx(0.1) and res["df"] == pytest.approx(63)
    assert res["p_value"] == pytest.approx(2 * sps.t.sf(3.0, 63))
    assert res["sd_seeds"] == 0 and res["tau_dl"] == 0
    # seeds with no image noise: a one-sample t-test on the estimates with the seed term inflated by c_k
    est = np.array([0.1, 0.3, 0.2])
    res = rep.combine_seeds(est, [0.0, 0.0, 0.0], 64)
    c3 = 2 / sps.chi2.ppf(0.3, 2)
    assert res["se"] == pytest.approx(np.sqrt(c3 * est.var(ddof=1) / 3)) and res["df"] == pytest.approx(2)
    assert res["ci_low"] < 0.2 < res["ci_high"]
    # DerSimonian-Laird's tau^2 for two seeds: (Q - 1) / (sum w - sum w^2 / sum w)
    res = rep.combine_seeds([0.0, 1.0], [0.1, 0.1], 64)
    assert res["tau_dl"] ** 2 == pytest.approx((50 - 1) / (200 - 100))
    # no variance at all: a zero estimate has p = 1
    assert rep.combine_seeds([0.0, 0.0], [0.0, 0.0], 64)["p_value"] == 1.0
    with pytest.raises(ValueError, match="at least 2 seeds"):
        rep.combine_seeds([0.1], [0.1], 64)


def test_p_value_combination_for_rows_without_an_interval():
    # the same direction everywhere: 2 x mean of the one-sided p (0.01), doubled for two sides
    assert rep.combine_p_values([-1, -0.8, -1], [0.02, 0.02, 0.02]) == pytest.approx(0.04)
    # opposite directions cancel
    assert rep.combine_p_values([1, -1], [0.02, 0.02]) == 1.0
    assert np.isnan(rep.combine_p_values([1, np.nan], [0.02, 0.02]))


def _claims(seed, rows):
    return pd.DataFrame([dict(claim_id=c, paper="p1", direction=d, estimate=e, ci_low=lo, ci_high=hi, p_value=p,
                              n=n, verdict=v) for c, d, e, lo, hi, p, n, v in rows])


def test_replicates_table_counts_seeds_and_combines():
    tables = {
        0: _claims(0, [("strong", 1, 0.30, 0.20, 0.40, 1e-5, 256, "holds"),
                       ("null", 1, 0.00, 0.00, 0.00, 1.0, 64, "not significant"),
                       ("ranks", -1, -1.0, np.nan, np.nan, 0.0167, 5, "suggestive"),
                       ("mixed", 1, 0.10, 0.00, 0.20, 0.04, 64, "suggestive")]),
        1: _claims(1, [("strong", 1, 0.28, 0.18, 0.38, 1e-5, 256, "holds"),
                       ("null", 1, 0.00, 0.00, 0.00, 1.0, 64, "not significant"),
                       ("ranks", -1, -0.9, np.nan, np.nan, 0.0167, 5, "suggestive"),
                       ("mixed", 1, -0.05, -0.15, 0.05, 0.4, 64, "not significant")]),
        2: _claims(2, [("strong", 1, 0.33, 0.23, 0.43, 1e-5, 256, "contradicted"),
                       ("null", 1, 0.00, 0.00, 0.00, 1.0, 64, "not significant"),
                       ("ranks", -1, -1.0, np.nan, np.nan, 0.0167, 5, "suggestive"),
                       ("mixed", 1, 0.02, -0.08, 0.12, 0.7, 64, "not significant")]),
    }
    t = rep.replicates_table(tables, alpha=ALPHA).set_index("claim_id")
    assert list(t.reset_index().columns) == ["claim_id", "paper", "direction", "estimate_seed0", "estimate_seed1",
                                             "estimate_seed2", "verdict_seed0", "verdict_seed1", "verdict_seed2",
                                             *rep.COMBINED]
    assert t.loc["strong", "n_holds"] == 2 and t.loc["null", "n_holds"] == 0 and (t["n_seeds"] == 3).all()
    assert t.loc["strong", "estimate"] == pytest.approx(np.mean([0.30, 0.28, 0.33]))
    assert t.loc["strong", "verdict"] == "holds" and t.loc["strong", "combined_test"] == rep.RE_TEST
    assert t.loc["null", "p_value"] == 1.0 and t.loc["null", "verdict"] == "not significant"
    assert t.loc["null", "combined_test"] == rep.P_TEST  # zero-width intervals: the seeds' own p-values
    assert t.loc["ranks", "combined_test"] == rep.P_TEST and np.isnan(t.loc["ranks", "ci_low"])
    assert t.loc["ranks", "p_value"] == pytest.approx(2 * 2 * 0.0167 / 2)
    assert t.loc["mixed", "verdict"] == "not significant"
    # Holm over the rows of this table
    p = t["p_value"].to_numpy(float)
    assert np.allclose(t["p_holm"].to_numpy(float), rep.stats.holm(p), equal_nan=True)
    with pytest.raises(ValueError, match="at least 2 seeds"):
        rep.replicates_table({0: tables[0]})


def test_zero_width_intervals_with_an_effect_are_not_read_as_a_null():
    """Every image flips in every seed: intervals [1, 1], exact p tiny; the combination must not give NaN."""
    tables = {s: _claims(s, [("all", 1, 1.0, 1.0, 1.0, 1e-6, 64, "holds")]) for s in (0, 1, 2)}
    t = rep.replicates_table(tables, alpha=ALPHA).set_index("claim_id")
    assert t.loc["all", "combined_test"] == rep.P_TEST and t.loc["all", "p_value"] == pytest.approx(2e-6)
    assert t.loc["all", "verdict"] == "holds"


def test_write_claims_replicates(tmp_path):
    paths = {}
    for s, e in ((0, 0.3), (1, 0.25)):
        paths[s] = tmp_path / f"claims{s}.csv"
        _claims(s, [("a", 1, e, e - 0.1, e + 0.1, 1e-4, 64, "holds")]).to_csv(paths[s], index=False)
    rep.write_claims_replicates(paths, tmp_path / "r.csv", tmp_path / "r.md")
    out = pd.read_csv(tmp_path / "r.csv")
    assert out.loc[0, "n_holds"] == 2 and out.loc[0, "estimate_seed1"] == 0.25
    assert "verdict_seed0" in (tmp_path / "r.md").read_text()


@pytest.mark.parametrize("seeds, message", [
    ([0, 0], "non-unique"), ([-1, 2], "replicates.seeds"), ([1.0, 2], "not non-negative integers"),
    (["a", 1], "replicates.seeds"), ([3], "at least 2")])
def test_config_refuses_bad_seeds(tmp_path, seeds, message):
    overlay = tmp_path / "o.yaml"
    overlay.write_text(f"replicates:\n  seeds: {seeds!r}\n".replace("'", '"'))
    with pytest.raises(ConfigError, match=message) as err:
        load_configs([ROOT / "config.yaml", overlay])
    assert "replicates.seeds" in str(err.value)


def test_config_replicates_overlays():
    cfg = load_configs([ROOT / "config.yaml", ROOT / "config" / "replicates.yaml"])
    assert cfg["replicates"]["seeds"] == [0, 1, 2] and cfg["replicates"]["module_seed"] is None
    assert load_configs([ROOT / "config.yaml"])["replicates"]["seeds"] == []
    cfg = load_configs([ROOT / "config.yaml", ROOT / "config" / "smoke.yaml", ROOT / "config" / "smoke_replicates.yaml"])
    assert cfg["replicates"]["seeds"] == [0, 1]


def test_config_refuses_replicates_without_claims(tmp_path):
    overlay = tmp_path / "o.yaml"
    overlay.write_text("replicates: {seeds: [0, 1]}\nclaims: {enabled: false}\n")
    with pytest.raises(ConfigError, match="replicates.seeds: needs claims.enabled"):
        load_configs([ROOT / "config.yaml", overlay])
    overlay.write_text("replicates: {module_seed: 1}\n")  # the internal key must match the seed
    with pytest.raises(ConfigError, match="replicates.module_seed"):
        load_configs([ROOT / "config.yaml", overlay])


def test_replicate_rules_run_their_stage_and_keep_their_provenance_apart():
    assert stage_name("replicate_seed2__train_addt") == "train_addt" and stage_name("train_addt") == "train_addt"
    assert stage_name("table_claims_replicates") == "table_claims_replicates"
    p = provenance_path("train_addt", {"defense": "addt"}, ["results/replicates/seed2/models/diffusion/addt"])
    assert str(p) == "results/replicates/seed2/provenance/train_addt/defense=addt.json"
    assert str(provenance_path("train_classifier", {}, ["results/models/classifier"])) == \
        "results/provenance/train_classifier.json"


def test_results_doc_shows_claims_replicates_only_when_present(tmp_path):
    from dbprepro.results_doc import render_results

    (tmp_path / "claims.csv").write_text("claim_id,where,verdict\na,x,holds\n")
    assert "claims_replicates" not in render_results(tmp_path, "0" * 32 + ".dir")
    (tmp_path / "claims_replicates.csv").write_text("claim_id,n_holds,verdict\na,2,holds\n")
    text = render_results(tmp_path, "0" * 32 + ".dir")
    assert text.index("`results/tables/claims.csv`") < text.index("`results/tables/claims_replicates.csv`") \
        < text.index("`results/tables/waterfall.csv`")
    assert "| a " in text.split("claims_replicates.csv")[1]
