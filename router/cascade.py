"""The Multiscale cascade (cascaded smoothing; Jeong and Shin, NeurIPS 2023) as a selection policy.

K smoothed experts with noise levels sigma_1 >= ... >= sigma_K (the largest first) and a threshold
p0 in [1/2, 1) define the *cascaded smoothed classifier*. With p_k(x, c) = P[f_k(x + sigma_k eps) = c]:

    G(x) = c   where stage k is the first stage with a class c such that p_k(x, c) > p0,
    G(x) = ABSTAIN   when no stage has such a class.

Because p0 >= 1/2, a stage has at most one class above p0, so G is well defined.

CERTIFY of G at one input x runs the stages in that order. At each stage k:

1. Selection: the expert's N0 selection samples give the guess c_k, the most frequent class.
2. Estimation: N fresh samples give the counts n_k[.], with one-sided Clopper-Pearson bounds
   L_k <= p_k(x, c_k) <= U_k.
3. If L_k >= p0, the stage *decides*: class c = c_k, with radius sigma_k (Phi^-1(L_k) - Phi^-1(p0)).
   If U_k >= p0 > L_k, the cascade abstains (this stage may fire, and we cannot tell which way).
   Otherwise it moves on to the next stage. The last (smallest sigma) stage abstains instead.
4. The decided radius is min'ed with a cap from each earlier, skipped stage j:
   R_j = sigma_j (Phi^-1(p0) - Phi^-1(V_j(c))), where V_j(c) is the Clopper-Pearson upper bound of
   max_{c' != c} n_j[c'], the largest count at stage j among the classes other than c. R_j is the
   radius within which stage j keeps every class other than c below p0. If some R_j < 0
   (V_j(c) > p0), the cascade abstains.

For p0 = 1/2 the decided radius is Cohen's sigma Phi^-1(L). For p0 > 1/2 it is shorter by
sigma_k Phi^-1(p0), because the stage must keep its class above p0, not only above 1/2. In
exchange the caps R_j grow by sigma_j Phi^-1(p0), and more inputs are passed on to the stages
with smaller sigma.

**Alpha split.** This split is our choice; it is not the paper's. The paper's code gives stage s
(0-based) alpha/(s+1). Those shares sum to more than alpha, and the caps are computed at the
deciding stage's share. Here the total alpha is split evenly, a_k = alpha / K per stage, whether
or not the stage runs. The schedule is fixed in advance, which a union bound needs. A stage
that can be skipped (every stage but the last) spends its share on three one-sided
Clopper-Pearson statements:

* a_k / 2 on the lower bound L_k of its guess;
* a_k / 4 on the upper bound of p_k(x, a), where a is the stage's true top class;
* a_k / 4 on the upper bound of p_k(x, b), where b is its true runner-up.

U_k and every V_k(c) are computed at a_k / 4. The last stage is never skipped, so its only
statement is L_K, at the full a_K. With one expert and p0 = 1/2, the cascade is exactly Cohen's
CERTIFY at alpha. See :func:`stage_levels`.

**Guarantee.** With probability at least 1 - alpha over all the noise drawn, for any experts
and any x: if the cascade returns class c with radius R (not ABSTAIN), then G(x') = c for
every x' with ||x' - x||_2 < R (in particular G(x) = c when R > 0).

*Proof.* Fix x, so the true probabilities are fixed. At stage k, let a and b be the classes with
the largest and second-largest p_k(x, .). Break ties by any fixed rule: a and b are unknown but
not random. The statements are:

* (S1) p_k(x, c_k) >= L_k;
* (S2) p_k(x, a) <= U(n_k[a]);
* (S3) p_k(x, b) <= U(n_k[b]).

U is the upper bound at level a_k / 4. The last stage makes only S1.

S1 fails with probability <= a_k / 2 (a_K at the last stage). The guess c_k depends only on the
selection stream, and the estimation counts are fresh draws from an independent stream, so
conditionally on c_k the count n_k[c_k] is Binomial(N, p_k(x, c_k)). S2 and S3 concern fixed
classes and fail with probability <= a_k / 4 each. A union bound over all the statements of all
K stages gives total failure <= sum_k a_k = alpha.

This needs no independence between stages. So it stays valid although every expert draws the
same keyed streams as its own single-expert CERTIFY (see below), which makes the stages' samples
strongly correlated, and although the decided class and the stage where the cascade stops depend
on the data. The move-on and abstain rules need not be right either: they only choose which of
the (true) statements the certificate uses.

Now assume every statement holds, and take ||x' - x|| < R. For any Gaussian-smoothed class
probability, Phi^-1(p_k(., c)) is 1/sigma_k-Lipschitz (Salman et al. 2019, Lemma 2).

* At the deciding stage k*: Phi^-1(p_{k*}(x', c)) > Phi^-1(L_{k*}) - R / sigma_{k*} >= Phi^-1(p0).
  So stage k* fires with c at x'.
* At each skipped stage j < k*: V_j(c) >= max_{c' != c} p_j(x, c'). If c != a, the maximiser a
  is one of the other classes and n_j[a] <= max_{c' != c} n_j[c'] (S2). If c = a, the maximum is
  p_j(x, b) (S3). Then for every c' != c, Phi^-1(p_j(x', c')) < Phi^-1(V_j(c)) + R / sigma_j
  <= Phi^-1(p0), so stage j does not fire with any class other than c.

So at x' the stages before k* fire with c or not at all, and stage k* fires with c. Hence
G(x') = c. QED.

**Noise streams.** Stage k draws from its expert's own keyed streams, ``select_stage`` and
``estimate_stage``, keyed by (seed, index). These are the draws of that expert's
:meth:`SmoothedClassifier.certify` with the same seed and index. A cascade can therefore be
replayed from stored per-expert counts with :func:`cascade_from_counts`, and a stage's guess and
count equal the single-expert run's. Stages below the one where the cascade stops are never
drawn.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Callable, Sequence

import numpy as np
from scipy.stats import norm as _norm

from dualrs_route.experts.errors import IncompatibleModelsError
from dualrs_route.experts.smoothing import SmoothedClassifier
from dualrs_route.experts.stats import (ABSTAIN, check_alpha, check_count, check_sigma, lower_confidence_bound,
                                        upper_confidence_bound)

DEFAULT_P0 = 0.5

DECIDE, ABSTAIN_HERE, NEXT = "decide", "abstain", "next"
"""Stage outcomes: the stage decided, the cascade abstained at it, or it moved on."""

CERTIFIED, UNDECIDED, EXHAUSTED, SKIPPED_BOUND = "certified", "undecided", "exhausted", "skipped-bound"
"""Certificate reasons: a certificate, the stopping stage's bounds straddle p0, no stage
reached p0, or an earlier skipped stage may fire with a class other than the decided one."""


def check_p0(p0: float) -> float:
    """Return ``p0`` as a float, or raise ValueError unless 1/2 <= p0 < 1."""
    try:
        value = float(p0)
    except (TypeError, ValueError):
        raise ValueError(f"--cascade-p0 must be a number in [0.5, 1), got {p0!r}") from None
    if not (0.5 <= value < 1.0):
        raise ValueError(f"--cascade-p0 must be in [0.5, 1) (at most one class can then exceed it), got {p0!r}")
    return value


@dataclass(frozen=True)
class StageLevels:
    """Failure probabilities one stage spends.

    ``lower`` goes on the lower bound of its guess. ``upper`` goes on each one-sided upper bound:
    the guess's, and those of the two fixed top classes behind the skipped-stage cap.
    """

    lower: float
    upper: float


def stage_levels(alpha: float, num_stages: int) -> tuple[StageLevels, ...]:
    """The even split of ``alpha`` over ``num_stages`` stages (module docstring: a_k = alpha / K).

    Every stage but the last spends a_k / 2 on the lower bound and a_k / 4 on each of two upper
    bounds. The last stage is never skipped and spends all of a_K on its lower bound; its upper
    bound is reported at a_K too, but no guarantee uses it.
    """
    alpha = check_alpha(alpha)
    k = check_count(num_stages, "number of cascade stages")
    share = alpha / k
    return tuple(StageLevels(share / 2.0, share / 4.0) for _ in range(k - 1)) + (StageLevels(share, share),)


def stage_outcome(p_lower: float, p_upper: float, p0: float) -> str:
    """DECIDE if p_lower >= p0, ABSTAIN_HERE if p_upper >= p0 > p_lower, else NEXT."""
    if p_lower >= p0:
        return DECIDE
    if p_upper >= p0:
        return ABSTAIN_HERE
    return NEXT


def decided_radius(sigma: float, p_lower: float, p0: float) -> float:
    """sigma * (Phi^-1(p_lower) - Phi^-1(p0)): stage's class stays above p0 within it (p_lower >= p0)."""
    sigma = check_sigma(sigma)
    if not (p0 <= p_lower <= 1.0):
        raise ValueError(f"p_lower must be in [p0, 1] = [{p0}, 1] to decide, got {p_lower!r}")
    if p_lower == 1.0:
        return math.inf
    return float(sigma * (_norm.ppf(p_lower) - _norm.ppf(p0)))


def other_classes_upper(counts, decided: int, alpha: float) -> float:
    """Upper bound on max_{c' != decided} p(c'): the CP upper bound of the largest other count.

    It is valid at once for every ``decided``, with probability >= 1 - 2 * alpha. See the
    module docstring, statements S2 and S3. It is 0.0 when there is no other class.
    """
    counts = np.asarray(counts, dtype=np.int64)
    others = np.delete(counts, int(decided))
    if others.size == 0:
        return 0.0
    return upper_confidence_bound(int(others.max()), int(counts.sum()), alpha)


def skipped_radius(sigma: float, other_upper: float, p0: float) -> float:
    """sigma * (Phi^-1(p0) - Phi^-1(other_upper)). Negative when other_upper > p0; inf at 0."""
    sigma = check_sigma(sigma)
    if other_upper <= 0.0:
        return math.inf
    return float(sigma * (_norm.ppf(p0) - _norm.ppf(other_upper)))


@dataclass(frozen=True)
class StageResult:
    """One stage of a cascade run.

    ``expert`` is the index of the stage's expert in the order the experts were given. ``guess``
    is the class the ``n0`` selection samples chose, and ``count`` its count among the ``n``
    estimation samples. ``counts`` holds every class's estimation count. The bounds on p(guess)
    are ``p_lower`` (at ``levels.lower``) and ``p_upper`` (at ``levels.upper``). ``outcome``
    is DECIDE, ABSTAIN_HERE or NEXT.

    ``radius`` depends on the outcome:

    * a deciding stage: its decided radius;
    * a skipped stage: its cap R_j for the decided class, with ``other_upper`` = V_j(c);
    * otherwise: None.
    """

    expert: int
    sigma: float
    guess: int
    count: int
    n0: int
    n: int
    counts: tuple[int, ...]
    p_lower: float
    p_upper: float
    levels: StageLevels
    outcome: str
    other_upper: float | None = None
    radius: float | None = None


@dataclass(frozen=True)
class CascadeCertificate:
    """Outcome of a cascade CERTIFY: the final class (or ABSTAIN) and radius, plus every stage that ran.

    ``stage`` is the position in the cascade (0 = largest sigma) where the run stopped, and
    ``expert`` is that stage's expert index. ``stages`` lists the stages that ran, in cascade
    order. ``reason`` is one of:

    * CERTIFIED: a certificate;
    * UNDECIDED: the stopping stage's bounds straddle p0;
    * EXHAUSTED: the last stage moved on too;
    * SKIPPED_BOUND: a stage decided, but the cap of some skipped stage is negative.

    The guarantee is the module docstring's: with probability >= 1 - alpha, G(x') = prediction
    for all ||x' - x|| < radius.
    """

    prediction: int
    radius: float
    stage: int
    expert: int
    reason: str
    p0: float
    stages: tuple[StageResult, ...]

    @property
    def abstained(self) -> bool:
        return self.prediction == ABSTAIN

    @property
    def samples(self) -> int:
        """Noisy samples drawn: N0 + N for every stage that ran."""
        return sum(s.n0 + s.n for s in self.stages)

    @property
    def decided_radius(self) -> float | None:
        """The stopping stage's own radius when it decided, else None."""
        last = self.stages[self.stage]
        return last.radius if last.outcome == DECIDE else None

    @property
    def skipped_radius(self) -> float | None:
        """min_j R_j over the skipped stages when a stage decided (None if none was skipped or none decided)."""
        caps = [s.radius for s in self.stages[:self.stage]]
        if self.decided_radius is None or not caps:
            return None
        return min(caps)

    def stages_text(self) -> str:
        """The stages as one TSV-safe cell, in cascade order, joined by ``;``.

        Each stage reads ``sigma:outcome:guess:count/n:p_lower:p_upper``. A skipped stage adds
        ``:V_j(c)`` once a class was decided.
        """
        parts = []
        for s in self.stages:
            text = f"{s.sigma:g}:{s.outcome}:{s.guess}:{s.count}/{s.n}:{s.p_lower:.6f}:{s.p_upper:.6f}"
            if s.other_upper is not None:
                text += f":{s.other_upper:.6f}"
            parts.append(text)
        return ";".join(parts)


def evaluate_stage(guess: int, counts, *, sigma: float, n0: int, levels: StageLevels, p0: float,
                   expert: int) -> StageResult:
    """Steps 2 and 3 of one stage from its guess and its estimation counts (int [num_classes])."""
    counts = np.asarray(counts, dtype=np.int64)
    n = int(counts.sum())
    count = int(counts[int(guess)])
    p_lower = lower_confidence_bound(count, n, levels.lower)
    p_upper = upper_confidence_bound(count, n, levels.upper)
    return StageResult(int(expert), float(sigma), int(guess), count, int(n0), n, tuple(int(v) for v in counts),
                       p_lower, p_upper, levels, stage_outcome(p_lower, p_upper, p0))


def run_cascade(draw: Callable[[int], tuple[int, np.ndarray]], *, sigmas: Sequence[float], n0: int, alpha: float,
                p0: float = DEFAULT_P0, experts: Sequence[int] | None = None) -> CascadeCertificate:
    """The cascade over stages in the order given, drawing stage k's data only when it is reached.

    ``draw(k)`` returns ``(guess, estimation counts)`` for cascade position k. ``sigmas[k]`` is
    that stage's noise level, and ``experts[k]`` its expert index (default k). ``n0`` counts the
    selection samples. ``alpha`` is the total failure probability, split by :func:`stage_levels`.
    """
    p0 = check_p0(p0)
    levels = stage_levels(alpha, len(sigmas))
    experts = list(range(len(sigmas))) if experts is None else list(experts)
    done: list[StageResult] = []
    for k, (sigma, level) in enumerate(zip(sigmas, levels)):
        guess, counts = draw(k)
        stage = evaluate_stage(guess, counts, sigma=sigma, n0=n0, levels=level, p0=p0, expert=experts[k])
        if stage.outcome == DECIDE:
            c = stage.guess
            skipped = []
            for s in done:
                v = other_classes_upper(s.counts, c, s.levels.upper)
                skipped.append(replace(s, other_upper=v, radius=skipped_radius(s.sigma, v, p0)))
            decided = replace(stage, radius=decided_radius(stage.sigma, stage.p_lower, p0))
            stages = tuple(skipped) + (decided,)
            radius = min([decided.radius] + [s.radius for s in skipped])
            if radius < 0.0:
                return CascadeCertificate(ABSTAIN, 0.0, k, stage.expert, SKIPPED_BOUND, p0, stages)
            return CascadeCertificate(c, radius, k, stage.expert, CERTIFIED, p0, stages)
        done.append(stage)
        if stage.outcome == ABSTAIN_HERE:
            return CascadeCertificate(ABSTAIN, 0.0, k, stage.expert, UNDECIDED, p0, tuple(done))
    return CascadeCertificate(ABSTAIN, 0.0, len(done) - 1, done[-1].expert, EXHAUSTED, p0, tuple(done))


def cascade_from_counts(draws: Sequence[tuple[int, Sequence[int]]], *, sigmas: Sequence[float], n0: int,
                        alpha: float, p0: float = DEFAULT_P0,
                        experts: Sequence[int] | None = None) -> CascadeCertificate:
    """Replay a cascade from stored counts: ``draws[k] = (guess, estimation counts)`` in cascade order.

    ``draws`` may stop early, but must cover every stage the cascade reaches. The guarantee
    is the module docstring's, provided the counts come from the streams described there.
    """
    if len(draws) > len(sigmas):
        raise ValueError(f"{len(draws)} stages of counts for {len(sigmas)} sigmas")

    def draw(k):
        if k >= len(draws):
            raise ValueError(f"the cascade reached stage {k}, but counts were given for only {len(draws)} stages")
        return draws[k]

    return run_cascade(draw, sigmas=sigmas, n0=n0, alpha=alpha, p0=p0, experts=experts)


class CascadeCertifier:
    """Multiscale cascade over smoothed experts, tried from the largest sigma down (module docstring).

    Equal sigmas keep the order given. Stage k's expert is ``experts[order[k]]``.
    """

    def __init__(self, experts: Sequence[SmoothedClassifier]):
        self.experts = list(experts)
        if not self.experts:
            raise IncompatibleModelsError("a cascade needs at least one expert")
        classes = {e.num_classes for e in self.experts}
        if len(classes) > 1:
            raise IncompatibleModelsError(f"cascade experts disagree on num_classes ({sorted(classes)}); "
                                          "all experts must classify the same classes")
        self.order = sorted(range(len(self.experts)), key=lambda k: (-self.experts[k].sigma, k))

    @property
    def sigmas(self) -> list[float]:
        """Noise levels in cascade order (non-increasing)."""
        return [self.experts[k].sigma for k in self.order]

    def certify(self, x: np.ndarray, *, n0: int, n: int, alpha: float, p0: float = DEFAULT_P0, seed: int = 0,
                index: int = 0) -> CascadeCertificate:
        """Cascade CERTIFY of one input ``x`` (float32 [C, H, W] in [0, 1]).

        With probability at least 1 - alpha, a non-abstaining result's class c satisfies
        G(x') = c for every ||x' - x||_2 < radius. G is the cascaded smoothed classifier at
        threshold p0 (module docstring).
        """
        n0 = check_count(n0, "N0")
        n = check_count(n, "N")
        alpha = check_alpha(alpha)
        p0 = check_p0(p0)

        def draw(k):
            return self.experts[self.order[k]].draw_counts(x, n0=n0, n=n, seed=seed, index=index)

        return run_cascade(draw, sigmas=self.sigmas, n0=n0, alpha=alpha, p0=p0, experts=self.order)


def cascade_guarantee(alpha: float, num_stages: int, p0: float) -> str:
    """The guarantee line of a cascade results file's sidecar."""
    return (f"each non-abstaining certified radius holds for the cascaded smoothed classifier (Multiscale, "
            f"p0 = {p0:g}, stages from the largest sigma down) with probability >= {1 - alpha:g} "
            f"(alpha/{num_stages} = {alpha / num_stages:g} per stage, union bound over stages)")


def cascade_row_fields(result: CascadeCertificate, expert_label: Callable[[int], str]) -> dict:
    """The cascade columns of a results row (router/run.py ``CASCADE_COLUMNS``) for ``result``;
    ``expert_label(k)`` names expert k as ``k:name``."""
    stop, decided = result.stages[result.stage], result.decided_radius
    return dict(predict=result.prediction, radius=result.radius, expert=expert_label(stop.expert),
                sigma=stop.sigma, radius_expert=0.0 if decided is None else decided,
                p_expert_lower=stop.p_lower, n_expert=stop.count, stage=result.stage,
                radius_skipped=result.skipped_radius, samples=result.samples, stages=result.stages_text())
