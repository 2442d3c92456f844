"""experts.stats against exact references: scipy, closed forms and the binomial-tail identity."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.special import comb
from scipy.stats import beta as beta_dist
from scipy.stats import binom, norm

from dualrs_route.experts import stats
from dualrs_route.experts.stats import (
    ABSTAIN,
    certified_radius,
    certify_from_counts,
    lower_confidence_bound,
    max_radius,
    predict_pvalue,
    top_two,
)

CASES = [(1, 1), (0, 1), (1, 2), (5, 10), (9, 10), (50, 100), (99, 100), (100, 100), (0, 100), (7, 13),
         (600, 1000), (9_990, 10_000), (99_950, 100_000)]
ALPHAS = [1e-12, 1e-6, 0.001, 0.05, 0.5, 0.9, 1 - 1e-9]


@pytest.mark.parametrize("n_a,n", CASES)
@pytest.mark.parametrize("alpha", ALPHAS)
def test_lower_bound_matches_scipy_beta_quantile(n_a, n, alpha):
    got = lower_confidence_bound(n_a, n, alpha)
    if n_a == 0:
        assert got == 0.0
    else:
        want = beta_dist.ppf(alpha, n_a, n - n_a + 1)
        assert got == pytest.approx(want, rel=1e-10, abs=1e-300)


@pytest.mark.parametrize("n", [1, 2, 10, 100, 1000, 100_000])
@pytest.mark.parametrize("alpha", ALPHAS)
def test_lower_bound_all_successes_is_alpha_to_the_one_over_n(n, alpha):
    # P[Bin(n, p) >= n] = p^n = alpha  =>  p = alpha^(1/n)
    assert lower_confidence_bound(n, n, alpha) == pytest.approx(alpha ** (1.0 / n), rel=1e-12)


@pytest.mark.parametrize("n", [1, 5, 1000])
def test_lower_bound_no_successes_is_zero(n):
    assert lower_confidence_bound(0, n, 0.001) == 0.0


def test_lower_bound_single_sample():
    # N = 1: n_a = 1 gives alpha itself, n_a = 0 gives 0.
    for alpha in ALPHAS:
        assert lower_confidence_bound(1, 1, alpha) == pytest.approx(alpha, rel=1e-12)
        assert lower_confidence_bound(0, 1, alpha) == 0.0


def test_lower_bound_closed_form_n_a_equals_one():
    # n_a = 1: P[Bin(n, p) >= 1] = 1 - (1 - p)^n = alpha  =>  p = 1 - (1 - alpha)^(1/n)
    for n in (2, 10, 1000):
        for alpha in (0.001, 0.05, 0.5):
            assert lower_confidence_bound(1, n, alpha) == pytest.approx(1 - (1 - alpha) ** (1 / n), rel=1e-9)


@pytest.mark.parametrize("n_a,n", [c for c in CASES if 0 < c[0] < c[1]])
@pytest.mark.parametrize("alpha", [1e-6, 0.001, 0.05, 0.5, 0.9])
def test_lower_bound_binomial_tail_identity(n_a, n, alpha):
    # The one-sided Clopper-Pearson bound p_L solves P[Bin(n, p_L) >= n_a] = alpha.
    p_l = lower_confidence_bound(n_a, n, alpha)
    assert binom.sf(n_a - 1, n, p_l) == pytest.approx(alpha, rel=1e-7)


def test_lower_bound_monotone_in_counts_and_alpha():
    n = 200
    bounds = [lower_confidence_bound(k, n, 0.01) for k in range(n + 1)]
    assert all(a < b for a, b in zip(bounds, bounds[1:]))
    by_alpha = [lower_confidence_bound(150, n, a) for a in (1e-6, 1e-3, 0.05, 0.5)]
    assert all(a < b for a, b in zip(by_alpha, by_alpha[1:]))
    assert by_alpha[-1] < 150 / n  # alpha < 1/2: below the point estimate


def test_lower_bound_matches_statsmodels_convention_two_alpha():
    # statsmodels' proportion_confint(n_a, n, alpha=2*alpha, method="beta")[0] is beta.ppf(alpha, ...):
    # derive it independently from the F-distribution form of Clopper-Pearson.
    from scipy.stats import f as f_dist

    for n_a, n in [(5, 10), (80, 100), (600, 1000)]:
        alpha = 0.001
        fq = f_dist.ppf(alpha, 2 * n_a, 2 * (n - n_a + 1))
        want = n_a * fq / (n - n_a + 1 + n_a * fq)
        assert lower_confidence_bound(n_a, n, alpha) == pytest.approx(want, rel=1e-8)


@pytest.mark.parametrize("args", [(-1, 10, 0.1), (11, 10, 0.1), (5, 0, 0.1), (5, 10, 0.0), (5, 10, 1.0),
                                  (5, 10, -0.5), (5, 10, 1.5), (5, 10, float("nan")), (2.5, 10, 0.1),
                                  (5, 10.5, 0.1), (5, 10, "x"), (True, 10, 0.1)])
def test_lower_bound_invalid_inputs_raise_value_error(args):
    with pytest.raises(ValueError):
        lower_confidence_bound(*args)


def exact_two_sided_pvalue(k: int, n: int) -> float:
    """Exact two-sided binomial test at p = 1/2: sum of pmf values <= pmf(k) (symmetric case)."""
    if n == 0:
        return 1.0
    pmf = np.array([comb(n, i, exact=True) for i in range(n + 1)], dtype=object)
    total = sum(pmf)
    keep = sum(v for v in pmf if v <= pmf[k])
    return min(1.0, float(keep) / float(total))


@pytest.mark.parametrize("top,second", [(0, 0), (1, 0), (5, 0), (5, 5), (6, 4), (10, 0), (9, 3), (30, 20), (17, 3),
                                        (40, 1), (3, 7)])
def test_predict_pvalue_exact_binomial_sum(top, second):
    assert predict_pvalue(top, second) == pytest.approx(exact_two_sided_pvalue(top, top + second), rel=1e-9)


def test_predict_pvalue_known_values():
    assert predict_pvalue(10, 0) == pytest.approx(2 * 0.5 ** 10)  # both tails of the extreme outcome
    assert predict_pvalue(1, 0) == 1.0
    assert predict_pvalue(5, 5) == 1.0


@pytest.mark.parametrize("args", [(-1, 3), (3, -1), (2.5, 1), (1, "a")])
def test_predict_pvalue_invalid(args):
    with pytest.raises(ValueError):
        predict_pvalue(*args)


@pytest.mark.parametrize("sigma", [0.12, 0.25, 0.5, 1.0, 3.0])
@pytest.mark.parametrize("p", [0.5, 0.6, 0.9, 0.999, 1 - 1e-12])
def test_certified_radius_is_sigma_times_probit(sigma, p):
    assert certified_radius(sigma, p) == pytest.approx(sigma * norm.ppf(p), rel=1e-12, abs=1e-15)


def test_certified_radius_edges():
    assert certified_radius(0.5, 0.5) == 0.0
    assert certified_radius(0.5, 1.0) == math.inf
    for bad_sigma in (0.0, -0.25, float("nan"), float("inf"), "a"):
        with pytest.raises(ValueError):
            certified_radius(bad_sigma, 0.9)
    for bad_p in (0.4999, -0.1, 1.0001, float("nan")):
        with pytest.raises(ValueError):
            certified_radius(0.5, bad_p)


@pytest.mark.parametrize("n,factor", [(100, 1.50), (1000, 2.46), (10_000, 3.20), (100_000, 3.81)])
def test_max_radius_matches_published_table(n, factor):
    # RS_NOTES: largest radius with p_hat = 1 at alpha = 0.001 is sigma * Phi^-1(alpha^(1/N)).
    assert max_radius(1.0, n, 0.001) == pytest.approx(factor, abs=0.006)
    assert max_radius(0.5, n, 0.001) == pytest.approx(0.5 * norm.ppf(0.001 ** (1 / n)), rel=1e-12)


def test_certify_from_counts_certifies_or_abstains_as_a_value():
    cert = certify_from_counts(3, 990, 1000, 0.5, 0.001)
    assert cert.prediction == 3 and not cert.abstained
    assert cert.p_lower == pytest.approx(beta_dist.ppf(0.001, 990, 11), rel=1e-10)
    assert cert.radius == pytest.approx(0.5 * norm.ppf(cert.p_lower), rel=1e-12)
    assert (cert.count, cert.n) == (990, 1000)
    low = certify_from_counts(3, 520, 1000, 0.5, 0.001)  # p_lower < 1/2
    assert low.prediction == ABSTAIN and low.abstained and low.radius == 0.0
    assert low.p_lower < 0.5


def test_certify_from_counts_abstain_boundary_is_p_lower_half():
    # Smallest n_a that certifies at N = 100, alpha = 0.05 is the first with CP lower bound >= 1/2.
    n, alpha = 100, 0.05
    first = next(k for k in range(n + 1) if beta_dist.ppf(alpha, k, n - k + 1) >= 0.5)
    assert certify_from_counts(0, first - 1, n, 1.0, alpha).abstained
    assert not certify_from_counts(0, first, n, 1.0, alpha).abstained


def test_top_two_ties_and_single_class():
    assert top_two([3, 7, 7, 1]) == (1, 2)
    assert top_two([5, 5]) == (0, 1)
    assert top_two([9]) == (0, 0)
    assert top_two(np.array([0, 0, 4])) == (2, 0)


def test_stats_module_is_torch_free():
    import ast
    import inspect

    tree = ast.parse(inspect.getsource(stats))
    imported = {a.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import) for a in node.names}
    imported |= {node.module.split(".")[0] for node in ast.walk(tree)
                 if isinstance(node, ast.ImportFrom) and node.module}
    assert "torch" not in imported
