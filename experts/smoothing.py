"""Cohen et al.'s smoothed classifier over any :class:`~experts.engine.NoisyCounter`.

g(x) = argmax_c P[f(x + eps) = c], eps ~ N(0, sigma^2 I), noise in [0, 1] pixel space.
"""

from __future__ import annotations

import numpy as np

from .engine import NoisyCounter
from .noise import NoiseKey, Stage
from .sequential import Schedule, SequentialCertificate, StopPolicy, certify_sequential
from .stats import (
    ABSTAIN,
    Certificate,
    certify_from_counts,
    check_alpha,
    check_count,
    check_sigma,
    predict_pvalue,
    top_two,
)

DEFAULT_N0 = 100
DEFAULT_N = 100_000
DEFAULT_ALPHA = 0.001


class SmoothedClassifier:
    """A Gaussian-smoothed classifier: a noisy counter plus its noise level ``sigma``.

    ``select_stage``/``estimate_stage``/``predict_stage`` name the noise streams, so
    that a router and an expert certifying the same example draw independent noise.
    """

    def __init__(
        self,
        counter: NoisyCounter,
        sigma: float,
        *,
        select_stage: Stage = Stage.EXPERT_SELECT,
        estimate_stage: Stage = Stage.EXPERT_ESTIMATE,
        predict_stage: Stage = Stage.EXPERT_PREDICT,
    ):
        self.counter = counter
        self.sigma = check_sigma(sigma)
        self.num_classes = counter.num_classes
        self.select_stage = select_stage
        self.estimate_stage = estimate_stage
        self.predict_stage = predict_stage

    def certify(
        self,
        x: np.ndarray,
        *,
        n0: int = DEFAULT_N0,
        n: int = DEFAULT_N,
        alpha: float = DEFAULT_ALPHA,
        seed: int = 0,
        index: int = 0,
    ) -> Certificate:
        """Cohen's CERTIFY for one input ``x`` (float32 [C, H, W] in [0, 1]).

        Draws ``n0`` selection samples and takes the most frequent class as the guess,
        then ``n`` fresh samples for the estimate. With probability at least
        1 - alpha, a non-abstaining result's class is g(x) and g is constant on the
        L2 ball of the returned radius around ``x``.
        """
        alpha = check_alpha(alpha)
        guess, estimate = self.draw_counts(x, n0=n0, n=n, seed=seed, index=index)
        return certify_from_counts(guess, int(estimate[guess]), n, self.sigma, alpha)

    def draw_counts(self, x: np.ndarray, *, n0: int = DEFAULT_N0, n: int = DEFAULT_N, seed: int = 0,
                    index: int = 0) -> tuple[int, np.ndarray]:
        """CERTIFY's draws: ``(guess, estimation counts int64 [num_classes])``, the guess from ``n0``
        selection samples (:meth:`select`) and the counts from ``n`` estimation samples.

        These are the only random quantities of :meth:`certify`: its certificate at any alpha, and
        the Multiscale cascade's stage for this expert (router/cascade.py), are functions of them."""
        n = check_count(n, "N")
        guess = self.select(x, n0=n0, seed=seed, index=index)
        return guess, self.estimation_counts(x, n=n, seed=seed, index=index)

    def select(self, x: np.ndarray, *, n0: int = DEFAULT_N0, seed: int = 0, index: int = 0) -> int:
        """CERTIFY's step 1: the most frequent class of ``n0`` selection samples (ties: lowest index)."""
        return int(np.argmax(self.selection_counts(x, n0=n0, seed=seed, index=index)))

    def selection_counts(self, x: np.ndarray, *, n0: int = DEFAULT_N0, seed: int = 0, index: int = 0) -> np.ndarray:
        """int64 [num_classes]: the class counts of CERTIFY's ``n0`` selection samples (:meth:`select`'s draws)."""
        n0 = check_count(n0, "N0")
        selection = self.counter.counts(x, self.sigma, n0, key=NoiseKey(seed, index, self.select_stage))
        return np.asarray(selection, dtype=np.int64)

    def estimation_counts(self, x: np.ndarray, *, n: int = DEFAULT_N, seed: int = 0, index: int = 0) -> np.ndarray:
        """int64 [num_classes]: the class counts of CERTIFY's ``n`` estimation samples."""
        n = check_count(n, "N")
        estimate = self.counter.counts(x, self.sigma, n, key=NoiseKey(seed, index, self.estimate_stage))
        return np.asarray(estimate, dtype=np.int64)

    def estimate_sequential(self, x: np.ndarray, guess: int, *, schedule: Schedule, policy: StopPolicy = StopPolicy(),
                            seed: int = 0, index: int = 0) -> SequentialCertificate:
        """Sequential CERTIFY's estimation for the selected class ``guess`` (:func:`experts.sequential.certify_sequential`).

        Round j counts samples [n_{j-1}, n_j) of this classifier's estimation stream, so the counts at a
        look equal those of a fixed-N CERTIFY with N = that look's sample count."""
        key = NoiseKey(seed, index, self.estimate_stage)

        def draw(start: int, stop: int) -> int:
            return int(self.counter.counts(x, self.sigma, stop - start, key=key, start=start)[guess])

        return certify_sequential(guess, draw, sigma=self.sigma, schedule=schedule, policy=policy)

    def certify_sequential(self, x: np.ndarray, *, n0: int = DEFAULT_N0, schedule: Schedule,
                           policy: StopPolicy = StopPolicy(), seed: int = 0, index: int = 0) -> SequentialCertificate:
        """Sequential CERTIFY of one input: :meth:`select`, then :meth:`estimate_sequential`.

        With probability at least 1 - sum(schedule.levels), a non-abstaining result's class is g(x) and g
        is constant on the L2 ball of the returned radius. A one-look schedule at level alpha gives
        exactly :meth:`certify` with N = that look.
        """
        guess = self.select(x, n0=n0, seed=seed, index=index)
        return self.estimate_sequential(x, guess, schedule=schedule, policy=policy, seed=seed, index=index)

    def predict(
        self, x: np.ndarray, *, n: int = DEFAULT_N, alpha: float = DEFAULT_ALPHA, seed: int = 0, index: int = 0
    ) -> tuple[int, np.ndarray]:
        """Cohen's PREDICT: the top class, or ABSTAIN when the top two counts are not
        separated by a two-sided binomial test at level ``alpha``.

        With probability at least 1 - alpha, a non-abstaining answer equals g(x).
        Returns ``(prediction, counts)``.
        """
        n = check_count(n, "N")
        alpha = check_alpha(alpha)
        counts = self.counter.counts(x, self.sigma, n, key=NoiseKey(seed, index, self.predict_stage))
        first, second = top_two(counts)
        if first == second:  # a single class: the test is on count vs 0
            pvalue = predict_pvalue(int(counts[first]), 0)
        else:
            pvalue = predict_pvalue(int(counts[first]), int(counts[second]))
        return (ABSTAIN if pvalue > alpha else int(first)), counts
