"""The claims' statistics on synthetic data with known answers: known values, a planted effect is
detected, a null is rejected at most at the stated rate, repeats of an image are not independent."""

import numpy as np
import pytest
from scipy import stats as sps

from dbprepro.claims import stats

ALPHA = 0.05


def _rate_bound(n_sims: int) -> float:
    """alpha plus three binomial standard errors of a rejection rate estimated from n_sims nulls."""
    return ALPHA + 3 * np.sqrt(ALPHA * (1 - ALPHA) / n_sims)


def test_mcnemar_exact_known_value():
    # 8 discordant pairs one way, 2 the other: 2 * P(Bin(10, 1/2) >= 8) = 2 * 56 / 1024
    a = np.array([1] * 8 + [0] * 2 + [1] * 5 + [0] * 5)
    b = np.array([0] * 8 + [1] * 2 + [1] * 5 + [0] * 5)
    n10, n01, p = stats.mcnemar_exact(a, b)
    assert (n10, n01) == (8, 2)
    assert p == pytest.approx(112 / 1024, abs=1e-12)
    assert stats.mcnemar_exact(a, a)[2] == 1.0


def test_sign_flip_exact_known_value():
    # all 2^3 sign patterns of (1, 2, 3): |mean| >= 2 only for +++ and ---
    assert stats.sign_flip_p(np.array([1.0, 2.0, 3.0])) == pytest.approx(2 / 8)
    assert stats.sign_flip_p(np.array([1.0, -1.0, 2.0, -2.0])) == 1.0


def test_exact_spearman_known_values():
    r = stats.exact_spearman([1, 2, 3, 4, 5], [5, 4, 3, 2, 1])
    assert r.estimate == pytest.approx(-1.0)
    assert r.p_value == pytest.approx(2 / 120)  # the two perfect orderings among 5!
    assert np.isnan(r.ci_low) and np.isnan(r.ci_high)
    # |rho| >= 0.9 has p = 10/120 (4 orderings one swap away from each perfect one): only |rho| = 1 rejects
    assert r.mde == pytest.approx(1.0)
    assert stats.exact_spearman([1, 2, 3, 4, 5], [1, 2, 3, 5, 4]).p_value == pytest.approx(10 / 120)
    four = stats.exact_spearman([1, 2, 3, 4], [4, 3, 2, 1])
    assert four.p_value == pytest.approx(2 / 24) and np.isnan(four.mde)  # four units can never reach 0.05
    assert stats.verdict(four, -1) == "not significant"


def test_holm_known_values():
    assert stats.holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    out = stats.holm([0.2, np.nan])
    assert out[0] == pytest.approx(0.2) and np.isnan(out[1])


def test_verdicts():
    sig_neg = stats.Result(-0.2, -0.3, -0.1, "t", 0, 0.01, 50, 0.1)
    assert stats.verdict(sig_neg, -1) == "holds"
    assert stats.verdict(sig_neg, +1) == "contradicted"
    assert stats.verdict(stats.Result(-0.2, -0.5, 0.1, "t", 0, 0.2, 50, 0.3), -1) == "not significant"
    with pytest.raises(ValueError):
        stats.verdict(sig_neg, 0)


def _correlated_pair(rng, n, p_a, p_b, rho_latent=0.6):
    """Two 0/1 outcomes on the same n images, positively correlated through a shared latent."""
    z = rng.standard_normal(n)
    za = rho_latent * z + np.sqrt(1 - rho_latent ** 2) * rng.standard_normal(n)
    zb = rho_latent * z + np.sqrt(1 - rho_latent ** 2) * rng.standard_normal(n)
    return (za < sps.norm.ppf(p_a)).astype(float), (zb < sps.norm.ppf(p_b)).astype(float)


def test_paired_binary_detects_a_planted_difference_and_keeps_the_null_rate():
    rng = np.random.default_rng(1)
    planted = [stats.paired_binary(*_correlated_pair(rng, 256, 0.45, 0.25), resamples=200, seed=s).p_value
               for s in range(40)]
    assert np.mean(np.array(planted) < ALPHA) >= 0.9  # 20 points on 256 images: power ~1
    n_null = 400
    null = [stats.paired_binary(*_correlated_pair(rng, 64, 0.3, 0.3), resamples=100, seed=s).p_value
            for s in range(n_null)]
    assert np.mean(np.array(null) < ALPHA) <= _rate_bound(n_null)


def test_paired_binary_interval_covers_the_true_difference():
    rng = np.random.default_rng(2)
    hits = []
    for s in range(200):
        a, b = _correlated_pair(rng, 128, 0.5, 0.35)
        r = stats.paired_binary(a, b, resamples=400, seed=s)
        hits.append(r.ci_low <= 0.15 <= r.ci_high)
    assert np.mean(hits) >= 0.88  # nominal 0.95; percentile bootstrap on 128 images


def test_paired_binary_refuses_scores_and_unpaired_input():
    with pytest.raises(ValueError, match="0/1"):
        stats.paired_binary([0.5, 1.0], [1.0, 0.0])
    with pytest.raises(ValueError, match="equal"):
        stats.paired_binary([1.0, 0.0, 1.0], [1.0, 0.0])


def test_paired_binary_mde_is_at_least_the_exact_tests_floor():
    a = np.ones(64)
    r = stats.paired_binary(a, a, resamples=100)
    assert r.p_value == 1.0 and r.mde == pytest.approx(6 / 64)  # 6 one-way discordant pairs: 2/64 < 0.05


def test_paired_values_planted_shift_and_null_rate():
    rng = np.random.default_rng(3)
    base = rng.standard_normal(64)
    shifted = stats.paired_values(base + 0.5 + 0.3 * rng.standard_normal(64), base, resamples=200)
    assert shifted.p_value < 1e-3 and shifted.ci_low > 0.3
    n_null = 300
    null = []
    for s in range(n_null):
        x = rng.standard_normal(40)
        null.append(stats.paired_values(x + rng.standard_normal(40), x + rng.standard_normal(40), resamples=100,
                                        seed=s).p_value)
    assert np.mean(np.array(null) < ALPHA) <= _rate_bound(n_null)


def _clustered(rng, n_images, repeats, slope):
    """Rows (image, repeat): an image effect shared by its repeats in both x and y."""
    u = np.repeat(rng.standard_normal(n_images), repeats)
    v = np.repeat(rng.standard_normal(n_images), repeats)
    x = u + 0.1 * rng.standard_normal(u.size)
    y = slope * u + v + 0.1 * rng.standard_normal(u.size)
    return x, y, np.repeat(np.arange(n_images), repeats)


def test_clustered_spearman_keeps_the_null_rate_where_pooling_rows_does_not():
    rng = np.random.default_rng(4)
    n_null, ours, naive = 200, [], []
    for s in range(n_null):
        x, y, g = _clustered(rng, 20, 4, 0.0)
        ours.append(stats.clustered_spearman(x, y, g, resamples=100, permutations=400, seed=s).p_value)
        naive.append(sps.spearmanr(x, y).pvalue)  # 80 rows as if independent
    assert np.mean(np.array(ours) < ALPHA) <= _rate_bound(n_null)
    assert np.mean(np.array(naive) < ALPHA) > 2 * ALPHA  # why the design matters: pooled rows over-reject


def test_clustered_spearman_detects_a_planted_correlation_and_refuses_ragged_units():
    rng = np.random.default_rng(5)
    x, y, g = _clustered(rng, 64, 3, -1.0)
    r = stats.clustered_spearman(x, y, g, resamples=300)
    assert r.estimate < -0.4 and r.p_value < 0.01 and r.ci_high < 0 and r.n == 64
    with pytest.raises(ValueError, match="same number"):
        stats.clustered_spearman(x[:-1], y[:-1], g[:-1])


def test_exact_spearman_null_rate():
    rng = np.random.default_rng(6)
    ps = np.array([stats.exact_spearman(rng.standard_normal(6), rng.standard_normal(6)).p_value for _ in range(400)])
    assert np.mean(ps < ALPHA) <= _rate_bound(400)


def test_sign_flip_monte_carlo_keeps_its_plus_one_correction():
    # 40 units all +1: no Monte Carlo sign pattern (other than all +) reaches |mean| = 1, so the uncorrected
    # estimate would be ~0; with the +1 correction it is (1 + hits) / (1 + resamples), never 0
    d = np.ones(40)
    for resamples in (99, 999):
        p = stats.sign_flip_p(d, resamples=resamples, seed=3)
        assert p > 0
        assert p == pytest.approx(1 / (1 + resamples), abs=1e-15)
    # and beyond the extreme: the estimate counts the hits plus one, over resamples plus one
    rng = np.random.default_rng(0)
    d = rng.normal(0.0, 1.0, size=30)
    p = stats.sign_flip_p(d, resamples=499, seed=1)
    k = round(p * 500)
    assert abs(p * 500 - k) < 1e-9 and 1 <= k <= 500
