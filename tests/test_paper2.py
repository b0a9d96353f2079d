"""Paper 2's analyses: known-answer tests of the estimators (distances, correlation summaries,
compression rate, Jacobian spectra, AUC), the chain trajectory, and the dwbox_c<k> setting."""

import numpy as np
import pandas as pd
import pytest
import torch

from dbprepro.attacks import (PGD, base_setting, evaluate_draws, is_fixed, setting_fixed_draw,
                              settings_randomness)
from dbprepro.config import ConfigError, fixed_setting_name, validate_config
from dbprepro.models.classifiers import SmallCNN
from dbprepro.paper2.compression import (association, compression_models_table, compression_rate, compression_table,
                                         jacobian, rank_auc, sample_perturbations, singular_values)
from dbprepro.paper2.distances import chain_distances, image_distances, pair_distances, summarise_distances
from dbprepro.paper2.dominance import correlation_matrix, mean_off_diagonal, purified_vectors
from dbprepro.purifiers import DefendedClassifier, Purifier
from dbprepro.randomness import Randomness
from dbprepro.paper2.fixed_randomness import p2_fixed_randomness_table


def purifier(tiny_diffusion, mode="fixed", fixed_draw=0):
    return Purifier(*tiny_diffusion, t_star=0.1, num_inference_steps=100,
                    randomness=Randomness(0, mode, fixed_draw=fixed_draw))


def images(b=4, seed=0):
    return torch.rand(b, 1, 8, 8, generator=torch.Generator().manual_seed(seed)) * 0.8 + 0.1


# -- the chain trajectory --------------------------------------------------------------------------
def test_trajectory_ends_at_the_purified_image_and_starts_at_the_input(tiny_diffusion):
    p = purifier(tiny_diffusion)
    x, ids, draws = images(3), torch.arange(7, 10), torch.tensor([0, 4, 9])
    tr = p.trajectory(x, ids, draws)
    assert torch.equal(tr.states[-1].clamp(0, 1), p(x, ids=ids, draws=draws))
    assert torch.equal(tr.states[0], x) and tr.phase[0] == "input"
    n_fwd, n_rev = tr.phase.count("forward"), tr.phase.count("reverse")
    assert n_rev == p.num_steps == 11 and n_fwd == 10  # grid times 10..100, then 11 reverse steps
    assert tr.t[:11] == [0, 10, 20, 30, 40, 50, 60, 70, 80, 90, 100] and tr.t[-1] == 0
    # the last forward state is the purifier's own x_{t*}; every forward state lies on the path
    # sqrt(abar_t) (2x - 1) + sqrt(1 - abar_t) eps with that same eps
    x_t = p.diffuse(x, ids, draws)
    torch.testing.assert_close(tr.states[10], (x_t + 1) / 2)
    abar = p.scheduler.alphas_cumprod.double()
    eps = (x_t.double() - abar[100].sqrt() * (2 * x.double() - 1)) / (1 - abar[100]).sqrt()
    want = (abar[40].sqrt() * (2 * x.double() - 1) + (1 - abar[40]).sqrt() * eps + 1) / 2
    torch.testing.assert_close(tr.states[4].double(), want, atol=1e-5, rtol=0)


# -- distances ---------------------------------------------------------------------------------------
def test_pair_distances_on_a_known_case():
    x = torch.zeros(2, 1, 4, 4)
    x_adv = x.clone()
    x_adv[0, 0, 0, :] = 0.1  # 4 pixels of 0.1: l2 0.2, linf 0.1
    x_adv[1, 0, 1, 1] = -0.3  # one pixel: l2 = linf = 0.3
    shift = torch.zeros(1, 1, 4, 4)
    shift[0, 0, 3, 3] = 0.5

    def p(z, ids=None, draws=None):  # a "purifier" that adds a constant offset
        return z + shift

    d = image_distances(p, x, x_adv, torch.arange(2), draw=0)
    np.testing.assert_allclose(d["adv_l2"], [0.2, 0.3], atol=1e-7)
    np.testing.assert_allclose(d["adv_linf"], [0.1, 0.3], atol=1e-7)
    np.testing.assert_allclose(d["purified_clean_l2"], [0.5, 0.5], atol=1e-7)
    np.testing.assert_allclose(d["purified_adv_vs_clean_l2"], d["adv_l2"], atol=1e-7)  # offsets cancel
    np.testing.assert_allclose(d["purified_adv_l2"], np.sqrt(np.array([0.04, 0.09]) + 0.25), atol=1e-7)
    np.testing.assert_allclose(d["purified_adv_linf"], [0.5, 0.5], atol=1e-7)
    s = summarise_distances(pd.DataFrame(d)).set_index(["pair", "norm"])
    assert s.loc[("purified_adv", "l2"), "share_above_adv"] == 1.0
    assert s.loc[("adv", "l2"), "share_above_adv"] == 0.0
    assert s.loc[("purified_clean", "l2"), "mean"] == pytest.approx(0.5)


def test_chain_distances_start_at_zero_and_end_at_the_purified_distance(tiny_diffusion):
    p = purifier(tiny_diffusion, "random")
    x, ids = images(3), torch.arange(3)
    c = chain_distances(p, x, x, ids, draw=5)
    assert (c.loc[c["step"] == 0, ["l2", "linf"]].to_numpy() == 0).all()
    last = c[c["step"] == c["step"].max()].sort_values("id")
    d = pair_distances(x, x, p(x, ids=ids, draws=torch.full_like(ids, 5)), x)
    np.testing.assert_allclose(last["l2"].to_numpy(), d["purified_clean_l2"], rtol=1e-6)
    # the forward path moves away from x
    fwd = c[c["phase"] == "forward"].groupby("step")["l2"].mean()
    assert fwd.iloc[-1] > fwd.iloc[0] > 0


# -- randomness dominance -------------------------------------------------------------------------
def test_correlation_summary_on_constructed_vectors():
    v = np.arange(10.0)
    assert mean_off_diagonal(correlation_matrix([v, 2 * v + 3, 5 * v])) == pytest.approx(1.0)
    assert mean_off_diagonal(correlation_matrix([v, -v])) == pytest.approx(-1.0)
    h = np.array([[1, 1, 1, 1], [1, -1, 1, -1], [1, 1, -1, -1], [1, -1, -1, 1]], float)[1:]  # centred, orthogonal
    assert mean_off_diagonal(correlation_matrix(h)) == pytest.approx(0.0, abs=1e-12)
    assert mean_off_diagonal(np.array([[1, 0.2, 0.4], [0.2, 1, 0.6], [0.4, 0.6, 1]])) == pytest.approx(0.4)
    # shared component with known correlation rho = a^2 / (a^2 + b^2) = 0.8
    g = np.random.default_rng(0)
    z, e = g.standard_normal(40_000), g.standard_normal((6, 40_000))
    vecs = 2.0 * z + 1.0 * e
    assert mean_off_diagonal(correlation_matrix(vecs)) == pytest.approx(0.8, abs=0.01)


def test_purified_vectors_separate_input_and_randomness_effects():
    s, r = 1.0, 0.2

    def noisy(z, ids, draws):  # P(z) = z + s * n(draw): the randomness alone moves the output
        n = torch.stack([torch.randn(z.shape[1:], generator=torch.Generator().manual_seed(int(d))) for d in draws])
        return z + s * n

    x = torch.full((1, 32, 32), 0.5)  # no clipping: delta uniform in [-r, r], variance r^2 / 3
    va, vb = purified_vectors(noisy, x, sid=3, samples=6, same_draw=0, distribution="uniform_linf", radius=r,
                              seed=0, batch_size=4)
    expected_a = s**2 / (s**2 + r**2 / 3)  # shared noise vs independent input perturbations
    assert mean_off_diagonal(correlation_matrix(va)) == pytest.approx(expected_a, abs=0.03)
    assert mean_off_diagonal(correlation_matrix(vb)) == pytest.approx(0.0, abs=0.06)  # independent draws

    def scale(z, ids, draws):  # deterministic, randomness ignored: (b) vectors are identical
        return 0.5 * z

    _, vb = purified_vectors(scale, torch.rand(1, 8, 8), sid=3, samples=4, same_draw=0,
                             distribution="uniform_linf", radius=r, seed=0)
    assert np.allclose(vb, vb[0]) and mean_off_diagonal(correlation_matrix(vb)) == pytest.approx(1.0)


# -- compression rate ----------------------------------------------------------------------------
@pytest.mark.parametrize("distribution", ["uniform_linf", "sphere_l2"])
@pytest.mark.parametrize("norm", ["l2", "linf"])
def test_compression_rate_of_known_maps(distribution, norm):
    x, ids = images(5), torch.arange(5)
    deltas = sample_perturbations(0, ids, 7, x.shape[1:], distribution, 0.2, "compression")
    for c in (1.0, 0.3, 2.0):
        cr, ratios = compression_rate(lambda z, i, d, c=c: c * z, x, ids, 0, deltas, norm=norm)
        np.testing.assert_allclose(cr, c, rtol=1e-5)
        np.testing.assert_allclose(ratios, c, rtol=1e-5)
    perm = torch.randperm(64, generator=torch.Generator().manual_seed(1))  # an isometry of both norms
    cr, _ = compression_rate(lambda z, i, d: z.flatten(1)[:, perm].view_as(z), x, ids, 0, deltas, norm=norm)
    np.testing.assert_allclose(cr, 1.0, rtol=1e-5)


def test_compression_rate_uses_the_applied_perturbation_after_clipping():
    x = torch.zeros(1, 1, 2, 2)
    deltas = torch.tensor([[[[[0.1, -0.1], [0.1, -0.1]]]]])  # the negative half is clipped away
    cr, _ = compression_rate(lambda z, i, d: z, x, torch.tensor([0]), 0, deltas)
    assert cr[0] == pytest.approx(1.0)
    cr, ratios = compression_rate(lambda z, i, d: z, x, torch.tensor([0]), 0, -deltas.abs())  # all clipped
    assert np.isnan(ratios).all()


def test_perturbations_are_keyed_and_in_the_ball():
    ids = torch.tensor([3, 8])
    u = sample_perturbations(0, ids, 5, (1, 8, 8), "uniform_linf", 0.2, "compression")
    s = sample_perturbations(0, ids, 5, (1, 8, 8), "sphere_l2", 0.5, "compression")
    assert u.shape == (2, 5, 1, 8, 8) and u.abs().max() <= 0.2 and u.abs().max() > 0.15
    torch.testing.assert_close(s.flatten(2).norm(dim=2), torch.full((2, 5), 0.5))
    assert torch.equal(u[1], sample_perturbations(0, ids[1:], 5, (1, 8, 8), "uniform_linf", 0.2, "compression")[0])
    assert not torch.equal(u[0], u[1])
    assert not torch.equal(u, sample_perturbations(0, ids, 5, (1, 8, 8), "uniform_linf", 0.2, "randomness"))


def test_jacobian_singular_values_of_known_maps():
    x = images(1)[0]
    J = jacobian(lambda z: 0.4 * z, x)
    torch.testing.assert_close(J, 0.4 * torch.eye(64))
    np.testing.assert_allclose(singular_values(J), 0.4, rtol=1e-6)
    diag = torch.linspace(-1.5, 1.0, 64).view(1, 8, 8)
    sv = singular_values(jacobian(lambda z: diag * z, x, chunk=10))  # chunked rows
    np.testing.assert_allclose(sv, np.sort(diag.abs().flatten().numpy())[::-1], rtol=1e-6)
    J = jacobian(lambda z: z**2, x)  # nonlinear: diag(2x)
    torch.testing.assert_close(J, torch.diag(2 * x.flatten()))


def test_jacobian_of_the_purifier_matches_finite_differences(tiny_diffusion):
    p = purifier(tiny_diffusion)
    x = images(1)[0]

    def fn(z):
        n = z.shape[0]
        return p(z, ids=torch.full((n,), 4), draws=torch.full((n,), 2))

    J = jacobian(fn, x, chunk=32)
    v = torch.randn(1, 8, 8, generator=torch.Generator().manual_seed(2))
    v /= v.norm()
    h = 1e-3
    fd = ((fn((x + h * v)[None]) - fn((x - h * v)[None])) / (2 * h)).flatten()
    torch.testing.assert_close(J @ v.flatten(), fd, atol=2e-3, rtol=0)
    # the batched CR estimator is independent of the chunking of the purifications
    ids = torch.arange(3)
    deltas = sample_perturbations(0, ids, 4, (1, 8, 8), "uniform_linf", 0.1, "compression")
    a, _ = compression_rate(lambda z, i, d: p(z, ids=i, draws=d), images(3), ids, 1, deltas, batch_size=5)
    b, _ = compression_rate(lambda z, i, d: p(z, ids=i, draws=d), images(3), ids, 1, deltas, batch_size=64)
    np.testing.assert_allclose(a, b, rtol=1e-5)


def test_rank_auc_and_association():
    sklearn = pytest.importorskip("sklearn.metrics")
    g = np.random.default_rng(0)
    s, y = g.integers(0, 5, 60).astype(float), g.integers(0, 2, 60)  # many ties
    assert rank_auc(s, y) == pytest.approx(sklearn.roc_auc_score(y, s))
    assert rank_auc([0.1, 0.2, 0.8, 0.9], [0, 0, 1, 1]) == 1.0
    assert rank_auc([0.1, 0.2, 0.8, 0.9], [1, 1, 0, 0]) == 0.0
    assert rank_auc([0.5] * 4, [0, 1, 0, 1]) == 0.5
    assert np.isnan(rank_auc([0.1, 0.2], [1, 1]))
    a = association([0.2, 0.3, 0.9, 1.0], [1, 1, 0, 0])  # lower CR <-> robust
    assert a["auc_low_cr_robust"] == 1.0 and a["spearman_rho"] < -0.8 and a["n_robust"] == 2


def test_compression_tables_pair_each_configuration_with_its_dwbox_run():
    cr = pd.DataFrame({"defense": "vanilla", "id": [1, 2, 3, 1, 2, 3], "label": 0, "config": [0, 0, 0, 1, 1, 1],
                       "cr": [0.2, 0.5, 0.9, 0.8, 0.1, 0.4], "cr_std": 0.0, "clean_correct": 1})
    rec = {0: pd.DataFrame({"id": [1, 2, 3], "correct_single": [1.0, 1.0, 0.0]}),
           1: pd.DataFrame({"id": [3, 2, 1], "correct_single": [0.0, 1.0, 0.0]})}
    per_image, summary = compression_table(cr, rec)
    assert per_image.set_index(["config", "id"])["robust"].to_dict() == {
        (0, 1): 1.0, (0, 2): 1.0, (0, 3): 0.0, (1, 1): 0.0, (1, 2): 1.0, (1, 3): 0.0}
    s = summary.set_index("scope")
    assert s.loc["config_0", "auc_low_cr_robust"] == 1.0 and s.loc["config_1", "auc_low_cr_robust"] == 1.0
    assert s.loc["all", "n"] == 6 and s.loc["all", "mean_cr_robust"] == pytest.approx((0.2 + 0.5 + 0.1) / 3)
    models = compression_models_table(
        {"vanilla": cr[cr["config"] == 0], "addt": cr[cr["config"] == 1].assign(defense="addt"),
         "other": cr[cr["config"] == 0].assign(cr=cr["cr"][:3] * 3)},
        {"vanilla": rec[0], "addt": rec[1], "other": rec[0].assign(correct_single=0.0)})
    m = models.set_index("defense")
    assert m.loc["vanilla", "robust_accuracy_dwbox"] == pytest.approx(2 / 3)
    assert m.loc["addt", "mean_cr"] == pytest.approx((0.8 + 0.1 + 0.4) / 3)
    # mean CR ranks (vanilla 0.533, addt 0.433, other 1.6) vs accuracy (2/3, 1/3, 0): rho = -0.5
    assert models["spearman_across_defenses"].iloc[0] == pytest.approx(-0.5)


# -- robustness under fixed randomness ----------------------------------------------------------
def records(setting, correct, defense="vanilla", column="correct_single"):
    n = len(correct)
    return pd.DataFrame({"defense": defense, "setting": setting, "id": np.arange(n), column: np.asarray(correct, float),
                         "correct_mean": np.asarray(correct, float)})


def test_fixed_randomness_table_gains_and_spread():
    und = records("none", [0, 0, 0, 0], defense="undefended")
    rnd = records("whitebox_eot", [1, 1, 1, 0])
    fixed = {0: records("dwbox", [1, 0, 0, 0]), 1: records("dwbox_c1", [1, 1, 0, 0])}
    t = p2_fixed_randomness_table(und, rnd, fixed).set_index("row")
    assert list(t.index) == ["undefended", "random", "fixed_c0", "fixed_c1", "fixed_mean"]
    assert t.loc["random", "gain_points"] == pytest.approx(75)
    assert t.loc["fixed_mean", "robust_accuracy"] == pytest.approx(0.375)
    assert t.loc["fixed_mean", "gain_points"] == pytest.approx(37.5)
    assert t.loc["fixed_mean", "gain_std_configs"] == pytest.approx(np.std([25, 50], ddof=1))
    assert (t.loc["fixed_mean", "gain_min_configs"], t.loc["fixed_mean", "gain_max_configs"]) == (25, 50)
    assert t.loc["fixed_mean", "gain_share_of_random"] == pytest.approx(0.5)
    t2 = p2_fixed_randomness_table(und, rnd, fixed, n_images=2).set_index("row")  # the first 2 ids only
    assert t2.loc["random", "robust_accuracy"] == 1.0 and t2.loc["fixed_c0", "n_images"] == 2


# -- the dwbox_c<k> setting ------------------------------------------------------------------------
def test_dwbox_config_setting_names():
    assert base_setting("dwbox_c3") == "dwbox" and base_setting("whitebox_eot") == "whitebox_eot"
    assert is_fixed("dwbox_c0") and is_fixed("dwbox") and not is_fixed("whitebox")
    assert setting_fixed_draw("dwbox_c12", default=5) == 12 and setting_fixed_draw("dwbox", default=5) == 5
    assert setting_fixed_draw("whitebox_eot") is None
    for bad in ("dwbox_c", "dwbox_c01", "dwbox_x1", "dwbox_c-1", "none"):
        with pytest.raises(ValueError, match="unknown setting"):
            base_setting(bad)
    r = settings_randomness("dwbox_c3", seed=7, fixed_draw=0)
    assert r.mode == "fixed" and r.fixed_draw == 3 and r.seed == 7
    assert settings_randomness("dwbox", seed=7, fixed_draw=2).fixed_draw == 2
    assert [fixed_setting_name(k, 1) for k in range(3)] == ["dwbox_c0", "dwbox", "dwbox_c2"]


def defended(tiny_diffusion, setting, fixed_draw=0):
    torch.manual_seed(0)
    p = Purifier(*tiny_diffusion, t_star=0.1, num_inference_steps=100,
                 randomness=settings_randomness(setting, seed=0, fixed_draw=fixed_draw))
    return DefendedClassifier(SmallCNN(width=8, hidden=16).eval(), p)


def test_dwbox_config_is_deterministic_differs_across_k_and_evaluates_with_k(tiny_diffusion):
    x, ids = images(3), torch.arange(20, 23)
    c1, c2 = defended(tiny_diffusion, "dwbox_c1"), defended(tiny_diffusion, "dwbox_c2")
    with c1.bind(ids=ids), c2.bind(ids=ids):
        a, b = c1.purifier(x, ids=ids), c2.purifier(x, ids=ids)
        assert torch.equal(a, c1.purifier(x, ids=ids))  # deterministic
        assert (a - b).abs().max() > 1e-3  # another configuration, another map
    # dwbox_c<k> is dwbox on configuration k
    plain = defended(tiny_diffusion, "dwbox", fixed_draw=2)
    assert torch.equal(plain.purifier(x, ids=ids), b)
    # PGD treats it as dwbox (one draw per step, always k), and refuses a purifier on another k
    pgd = PGD(c2, "dwbox_c2", steps=2, eot=10)
    assert pgd.setting == "dwbox" and pgd.eot == 1 and pgd.draws(0, 1).tolist() == [2]
    with pytest.raises(ValueError, match="configuration 2"):
        PGD(c1, "dwbox_c2")
    with pytest.raises(ValueError, match="fixed"):
        PGD(defended(tiny_diffusion, "whitebox"), "dwbox_c1")
    # evaluation purifies with configuration k, only k
    seen = []
    real = c2.purifier.randomness.generators
    c2.purifier.randomness.generators = lambda i, d, s, t: seen.append(np.asarray(d).tolist()) or real(i, d, s, t)
    preds = evaluate_draws(c2, x, ids, 3, "dwbox_c2")
    assert {v for row in seen for v in row} == {2}
    with c2.bind(ids=ids, draws=torch.full_like(ids, 2)):
        assert (preds == c2(x).argmax(1).numpy()[:, None]).all()
    with pytest.raises(ValueError, match="configuration"):
        evaluate_draws(c1, x, ids, 1, "dwbox_c2")


def test_attack_stage_runs_dwbox_config_and_records_its_own_evaluation(tmp_path, tiny_diffusion):
    from dbprepro.data import load_split, prepare_split
    from dbprepro.models.classifiers import save_classifier
    from dbprepro.models.diffusion import save_diffusion
    from dbprepro.attacks.runner import run_attack_shard

    prepare_split("digits", {"train": tmp_path / "tr.npz", "test": tmp_path / "te.npz"}, tmp_path / "s.json",
                  test_fraction=0.2, seed=0)
    torch.manual_seed(0)
    clf = SmallCNN(width=8, hidden=16).eval()
    save_classifier(clf, "small_cnn", {"width": 8, "hidden": 16}, tmp_path / "clf")
    save_diffusion(*tiny_diffusion, tmp_path / "dif")
    cfg = validate_config({"name": "t", "data": {"n_test": 64}, "analysis": {"n_images": 4},
                           "attacks": {"n_images": 4, "batch_size": 4, "shards": 1, "track_images": 0,
                                       "pgd": {"steps": 1, "eot": 2}, "eval_draws": 2}})
    df = run_attack_shard(tmp_path / "clf", tmp_path / "dif", tmp_path / "te.npz", tmp_path / "s.json",
                          records=tmp_path / "r.parquet", trace=tmp_path / "t.parquet", paths=tmp_path / "p.npz",
                          adv=tmp_path / "a.npz", defense="vanilla", threat="linf", setting="dwbox_c3", attack="pgd",
                          shard=0, attacks=cfg["attacks"], purification=cfg["purification"],
                          variance_type="fixed_large", seed=0, device=torch.device("cpu"))
    assert (df["setting"] == "dwbox_c3").all()
    split = load_split(tmp_path / "te.npz", tmp_path / "s.json").head(4)
    with np.load(tmp_path / "a.npz") as z:
        x_adv = torch.as_tensor(z["x_adv"])
    p = Purifier(*tiny_diffusion, t_star=0.1, num_inference_steps=100, randomness=Randomness(0, "fixed", 3))
    with torch.no_grad():
        pred = clf(p(x_adv, ids=split.ids)).argmax(1)
    assert df["correct_single"].tolist() == (pred == split.labels).float().tolist()


def test_analysis_config_is_checked():
    ok = validate_config({"name": "t"})
    assert ok["analysis"]["fixed_configs"] == 4 and ok["analysis"]["threat_model"] is None
    assert ok["analysis"]["n_images"] == ok["attacks"]["n_images"]  # null = every attacked image
    with pytest.raises(ConfigError, match="analysis.threat_model"):
        validate_config({"name": "t", "analysis": {"threat_model": "nope"}})
    with pytest.raises(ConfigError, match="analysis.n_images"):
        validate_config({"name": "t", "attacks": {"n_images": 8, "batch_size": 4}, "analysis": {"n_images": 16}})
    with pytest.raises(ConfigError, match="unknown config key"):
        validate_config({"name": "t", "analysis": {"probes": 3}})
