"""The Wilson score interval behind every table's confidence interval (dbprepro.metrics), checked
against an outside reference: Newcombe (1998), Statistics in Medicine 17:857, Table I, the score
method without continuity correction (values agree with scipy's binomtest(...).proportion_ci
"wilson" to the 4 decimals printed)."""

import pytest
from scipy.stats import binomtest

from dbprepro.metrics import wilson_interval

# successes, n, (lower, upper) at 95 % - Newcombe (1998), Table I, method 3
NEWCOMBE = [(81, 263, (0.2553, 0.3662)), (15, 148, (0.0624, 0.1605)), (0, 20, (0.0000, 0.1611)),
            (1, 29, (0.0061, 0.1718))]


@pytest.mark.parametrize("k, n, expected", NEWCOMBE)
def test_wilson_interval_matches_newcombe_table_1(k, n, expected):
    lo, hi = wilson_interval(k, n, 0.95)
    assert lo == pytest.approx(expected[0], abs=5e-5) and hi == pytest.approx(expected[1], abs=5e-5)


@pytest.mark.parametrize("k, n, expected", NEWCOMBE)
def test_the_fractional_formula_matches_newcombe_too(k, n, expected):
    """Fractional successes (mean correctness over draws) take the hand-written formula, not
    scipy: a hair above k it must give the same published interval."""
    lo, hi = wilson_interval(k + 1e-7, n, 0.95)
    assert lo == pytest.approx(expected[0], abs=5e-5) and hi == pytest.approx(expected[1], abs=5e-5)


@pytest.mark.parametrize("k, n", [(81, 263), (37, 50), (3, 40)])
def test_wilson_interval_at_99_percent_uses_the_99_percent_z(k, n):
    ref = binomtest(k, n).proportion_ci(confidence_level=0.99, method="wilson")
    for successes in (k, k + 1e-7):  # the scipy path and the fractional formula
        lo, hi = wilson_interval(successes, n, 0.99)
        assert lo == pytest.approx(ref.low, abs=1e-6) and hi == pytest.approx(ref.high, abs=1e-6)
    lo95, hi95 = wilson_interval(k, n, 0.95)
    assert lo < lo95 and hi > hi95  # wider than the 95 % interval (z = 2.576 vs 1.960)
