"""Pure statistics of randomized smoothing (Cohen, Rosenfeld and Kolter, 2019).

No torch here: these functions take counts and return bounds, p-values and
radii, so they can be checked against exact reference values in isolation.

Guarantees, with ``alpha`` the failure probability:

* :func:`lower_confidence_bound` is the one-sided (1 - alpha) Clopper-Pearson
  lower bound on a binomial proportion: P[p >= bound] >= 1 - alpha.
* :func:`certified_radius` turns a lower bound on the top-class probability of
  a Gaussian-smoothed classifier with noise ``sigma`` into an L2 radius in the
  same (pixel) units as ``sigma``.
* :func:`predict_pvalue` is PREDICT's two-sided binomial test of the top two
  counts at p = 1/2 (Hung and Fithian, 2019).

Abstention is a value (:data:`ABSTAIN`), never an exception.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from scipy.stats import beta as _beta
from scipy.stats import binomtest as _binomtest
from scipy.stats import norm as _norm

ABSTAIN = -1
"""Class index returned when a smoothed classifier abstains."""


def check_alpha(alpha: float, name: str = "alpha") -> float:
    """Return ``alpha`` as a float, or raise ValueError unless 0 < alpha < 1."""
    try:
        value = float(alpha)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number in (0, 1), got {alpha!r}") from None
    if not (0.0 < value < 1.0) or math.isnan(value):
        raise ValueError(f"{name} must be in the open interval (0, 1), got {alpha!r}")
    return value


def check_sigma(sigma: float, name: str = "sigma") -> float:
    """Return ``sigma`` as a float, or raise ValueError unless it is finite and > 0."""
    try:
        value = float(sigma)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a positive number, got {sigma!r}") from None
    if not (value > 0.0) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number > 0, got {sigma!r}")
    return value


MAX_SAMPLES = 10**9
"""Largest sample budget (N, N0 and the router's) a run accepts: 10^9 noisy samples of one input
already take hours on a GPU for a small network; larger budgets are refused up front."""


def check_count(n: int, name: str, minimum: int = 1, maximum: int | None = None) -> int:
    """Return ``n`` as an int, or raise ValueError unless it is an integer in [minimum, maximum]."""
    if isinstance(n, bool) or int(n) != n:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {n!r}")
    if int(n) < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {n}")
    if maximum is not None and int(n) > maximum:
        raise ValueError(f"{name} must be <= {maximum:,}, got {int(n):,}")
    return int(n)


def check_budget(n: int, name: str) -> int:
    """:func:`check_count` for a sample budget: an integer in [1, :data:`MAX_SAMPLES`]."""
    return check_count(n, name, maximum=MAX_SAMPLES)


def lower_confidence_bound(n_a: int, n: int, alpha: float) -> float:
    """One-sided (1 - alpha) Clopper-Pearson lower bound on p from ``n_a`` successes in ``n``.

    Equal to ``statsmodels.proportion_confint(n_a, n, alpha=2*alpha, method="beta")[0]``
    and to ``scipy.stats.beta.ppf(alpha, n_a, n - n_a + 1)``; 0.0 when ``n_a == 0``
    and ``alpha ** (1/n)`` when ``n_a == n``.
    """
    n = check_count(n, "n")
    n_a = check_count(n_a, "n_a", minimum=0)
    alpha = check_alpha(alpha)
    if n_a > n:
        raise ValueError(f"n_a must be <= n, got n_a={n_a} > n={n}")
    if n_a == 0:
        return 0.0
    if n_a == n:
        return float(alpha ** (1.0 / n))
    return float(_beta.ppf(alpha, n_a, n - n_a + 1))


def upper_confidence_bound(n_a: int, n: int, alpha: float) -> float:
    """One-sided (1 - alpha) Clopper-Pearson upper bound on p from ``n_a`` successes in ``n``.

    Equal to ``scipy.stats.beta.ppf(1 - alpha, n_a + 1, n - n_a)``, computed as
    ``1 - lower_confidence_bound(n - n_a, n, alpha)``. It is 1.0 when ``n_a == n`` and
    ``1 - alpha ** (1/n)`` when ``n_a == 0``.
    """
    if int(n_a) > int(n):
        raise ValueError(f"n_a must be <= n, got n_a={n_a} > n={n}")
    return 1.0 - lower_confidence_bound(int(n) - int(n_a), n, alpha)


def certified_radius(sigma: float, p_lower: float) -> float:
    """L2 radius sigma * Phi^-1(p_lower) certified by a lower bound ``p_lower`` >= 1/2.

    Units are those of ``sigma`` (pixels in [0, 1] throughout this package).
    Returns 0.0 at p_lower = 1/2 and raises ValueError below 1/2 (that is an abstain).
    """
    sigma = check_sigma(sigma)
    if not (0.5 <= p_lower <= 1.0):
        raise ValueError(f"p_lower must be in [0.5, 1] to certify, got {p_lower!r}")
    if p_lower == 1.0:
        return math.inf
    return float(sigma * _norm.ppf(p_lower))


def predict_pvalue(count_top: int, count_second: int) -> float:
    """Two-sided binomial-test p-value of ``count_top`` out of ``count_top + count_second`` at p = 1/2.

    PREDICT abstains when this p-value exceeds alpha. Uses scipy's ``binomtest``
    (``binom_test`` was removed in SciPy 1.12).
    """
    count_top = check_count(count_top, "count_top", minimum=0)
    count_second = check_count(count_second, "count_second", minimum=0)
    total = count_top + count_second
    if total == 0:
        return 1.0
    return float(_binomtest(count_top, total, p=0.5, alternative="two-sided").pvalue)


@dataclass(frozen=True)
class Certificate:
    """Outcome of CERTIFY for one input.

    ``prediction`` is the certified class or :data:`ABSTAIN`; ``radius`` is the
    certified L2 radius (0.0 on abstain); ``p_lower`` the Clopper-Pearson lower
    bound on the top-class probability; ``count`` the top-class count among the
    ``n`` estimation samples.
    """

    prediction: int
    radius: float
    p_lower: float
    count: int
    n: int

    @property
    def abstained(self) -> bool:
        return self.prediction == ABSTAIN


def certify_from_counts(guess: int, n_a: int, n: int, sigma: float, alpha: float) -> Certificate:
    """Cohen's CERTIFY steps 3-5: from the selected class ``guess`` and its estimation count.

    With probability at least 1 - alpha over the estimation samples, if the result
    does not abstain, the smoothed classifier predicts ``guess`` everywhere within
    ``radius`` of the input.
    """
    p_lower = lower_confidence_bound(n_a, n, alpha)
    if p_lower < 0.5:
        return Certificate(ABSTAIN, 0.0, p_lower, int(n_a), int(n))
    return Certificate(int(guess), certified_radius(sigma, p_lower), p_lower, int(n_a), int(n))


def top_two(counts) -> tuple[int, int]:
    """Indices of the largest and second-largest counts (ties: lowest index first)."""
    order = sorted(range(len(counts)), key=lambda k: (-int(counts[k]), k))
    if len(order) == 1:
        return order[0], order[0]
    return order[0], order[1]


def max_radius(sigma: float, n: int, alpha: float) -> float:
    """Largest radius CERTIFY can return with ``n`` samples: sigma * Phi^-1(alpha ** (1/n))."""
    return certified_radius(sigma, lower_confidence_bound(n, n, alpha))
