"""Sequential CERTIFY: estimation samples drawn in rounds, stopped once more samples cannot change the answer.

No torch here. The procedure sees the estimation stream only through ``draw(start, stop)``, the count
of the selected class among estimation samples [start, stop) of one keyed stream, so round j's samples
are the next block of the same stream: a larger cap extends a run instead of redrawing it, and a row is
a pure function of (inputs, models, seed), whatever the batch size.

**Schedule and validity (a union bound over a fixed schedule of looks).** The looks
n_1 < n_2 < ... < n_J = N (the cap) are fixed before any sample is drawn: n_1 = ``first`` (default
100), each next one ``ratio`` times the last (default 1.2, rounded up) while below N / sqrt(ratio),
then N itself (N = 100,000 gives J = 39 looks; ratio 2 gives 11). Look j computes the one-sided Clopper-Pearson
lower bound LB_j at level alpha_j, with alpha_1 + ... + alpha_J = alpha. Let p be the true probability
of the selected class. The event E = {LB_j > p for some j} has P[E] <= sum_j P[LB_j > p] <= sum_j
alpha_j = alpha. Outside E every LB_j <= p, so at *any* stopping time, however it depends on the
counts, the reported bound max_{i <= tau} LB_i is <= p as well. So a non-abstaining result (class c,
sigma * Phi^-1(max LB)) holds with probability >= 1 - alpha, as Cohen's CERTIFY does. Clopper-Pearson
recomputed at the full alpha at every look has no such bound: its P[E] grows towards J * alpha (the
tests show it failing the exact oracle).

**How alpha is split.** The union bound reuses the exact Clopper-Pearson bound, so a one-look schedule
is Cohen's CERTIFY bit for bit. Its price is that look j runs at alpha_j < alpha; the Clopper-Pearson
quantile depends on log(1 / alpha_j), so the price is paid in log(J) at an even split. Rows that decide
early (hopeless rows, target-radius rows, rows at p_hat = 1 that pass a grid radius quickly) hardly
feel it; rows that need the whole cap do, and they are the ones whose certified accuracy differs from
a fixed-N run. So by default the cap gets ``final_share`` = 0.7 of alpha and the J - 1 earlier looks
split the rest evenly (``final_share=None``: alpha / J at every look). At N = 100,000 and alpha =
0.001 the cap's largest radius is then 3.80 sigma (fixed N: 3.81, even split over 39 looks: 3.70). The
cap always keeps the largest level. Betting confidence sequences (Voracek et al. 2024) can be tighter
still, but their bound is not a closed-form quantile and a one-look run would no longer equal CERTIFY;
they are left for later.

**Upper bounds, one-sided on each side.** The futility rule uses the one-sided Clopper-Pearson upper
bound UB_j at the same level alpha_j. The certificate does not rely on it: stopping only ends the
sampling, and E above covers every stopping rule. Separately, P[UB_j < p for some j] <= alpha, so with
probability >= 1 - alpha every futility stop is right (p really is below the threshold). The two
statements hold together with probability >= 1 - 2 alpha; a two-sided interval at alpha in total
would halve the lower bound's level for a claim the certificate never makes.

**Stop rules** (checked at every look, first match wins; :data:`STOP_RULES`):

* ``target``: the certified radius has reached the target radius R, or the policy's
  ``enough_radius`` (beyond which no radius is worth anything; min-aware dual);
* ``futile``: UB_j is below 1/2, or below Phi(R / sigma) with a target R: no further sample can
  certify (at R) with the guarantee above. With a ``radius_grid`` and ``projection_level`` also
  when a row not yet certified has a projected cap bound (see ``grid``) below 1/2: r = 0 is the grid
  point at stake and the cap plausibly cannot reach it (a heuristic, like the grid projection);
* ``unreachable``: even if every remaining sample up to the cap were a hit, the lower bound at the
  final look could not certify (reach R, with a target) nor beat the current bound;
* ``tolerance`` (no target, no grid): the reachable radius at the cap (at most ``enough_radius``) is
  within ``radius_tol`` of the current radius, so stopping loses at most ``radius_tol`` of radius
  against running to the cap;
* ``grid`` (no target, a ``radius_grid`` step g): the next multiple of g above the current radius,
  g+, is out of reach: above the reachable radius (or ``enough_radius``), or its probability
  Phi(g+ / sigma) is above UB_j, or (``projection_level`` gamma, default 0.05) above the cap's lower
  bound projected with the remaining samples hitting at rate UB(gamma), the (1 - gamma) upper
  confidence bound of p from the counts so far. The first case can never change the row's certified
  accuracy at a multiple of g against running to the cap with the same schedule; the second does so
  only if the cap run would have certified g+ although p < Phi(g+ / sigma) <= its lower bound, or if
  UB_j < p: probability <= 2 alpha per row. The projection is a heuristic: it stops rows whose p is
  plausibly too low for the cap to reach g+, where the first two rules would run them to the cap.
  It cost at most 0.4 points of certified accuracy against fixed N = 100,000 at any grid radius in the
  simulations of benchmarks/RESULTS.md (worst of 5 seeds), for about 2x fewer samples. (None of this touches the
  certificate's own guarantee: every stopping rule is covered by E above.)
* ``cap``: the last look.

The reachable bound is the final look's lower bound with every remaining sample a hit. The cap's
level is the largest, so it is the largest lower bound any later look can give (one more trial that is a hit raises the
Clopper-Pearson lower bound), so ``unreachable`` and ``tolerance`` never stop a row that could still
certify (at R) or gain more than ``radius_tol``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Callable

from scipy.special import ndtr

from .stats import (
    ABSTAIN,
    Certificate,
    certified_radius,
    check_alpha,
    check_count,
    check_sigma,
    lower_confidence_bound,
    upper_confidence_bound,
)

DEFAULT_FIRST_LOOK = 100
"""Samples at the first look; the looks grow by ``DEFAULT_LOOK_RATIO`` from there up to the cap."""
DEFAULT_LOOK_RATIO = 1.2
"""Each look has this many times the previous look's samples (rounded up): 39 looks from 100 to 100,000.
A finer schedule stops rows nearer the sample count they need (a row overshoots by up to the ratio) at
the price of more looks sharing alpha; 1.2 beat 1.3, 1.5 and 2 on the simulated CIFAR-10 runs
(benchmarks/RESULTS.md)."""
DEFAULT_FINAL_SHARE = 0.7
"""Share of alpha kept for the last look (the cap); the other looks split the rest evenly. Rows that
need the whole cap are the ones whose certificate the split costs most, so they keep most of alpha
(log(1 / alpha) at the cap grows by 0.36 against a fixed-N run instead of log(J) = 3.7 with an even
split over 39 looks)."""
DEFAULT_PROJECTION_LEVEL = 0.05
"""Grid stop (``radius_grid``): a row stops once the lower bound the cap would give, with the remaining
samples hitting at the (1 - level) upper confidence bound of p, cannot reach the next grid radius.
This is a sampling heuristic, never part of the certificate; 0.05 lost at most 0.4 points of certified
accuracy against fixed N = 100,000 in the simulations of benchmarks/RESULTS.md (worst of 5 seeds). ``None``: only the
all-hits reach and the upper bound at the look's level stop a grid row (no loss beyond 2 alpha per row)."""
DEFAULT_RADIUS_TOL = 0.01
"""Default ``radius_tol`` in pixel units (L2 in [0, 1] pixel space). Small on purpose: a row stopped by
the tolerance rule can fall just below a grid radius it would have reached (0.05 cost 16.6 points of
certified accuracy at r = 0.75 in a simulation of the committed sigma = 0.25 CIFAR-10 run at N = 10,000,
where many rows sit between 0.75 and the cap's largest radius 0.78). For certified accuracy at grid
radii use ``radius_grid`` instead."""
STOP_TARGET, STOP_FUTILE, STOP_UNREACHABLE, STOP_TOLERANCE, STOP_GRID, STOP_CAP = (
    "target", "futile", "unreachable", "tolerance", "grid", "cap")
STOP_RULES = (STOP_TARGET, STOP_FUTILE, STOP_UNREACHABLE, STOP_TOLERANCE, STOP_GRID, STOP_CAP)

Draw = Callable[[int, int], int]
"""``draw(start, stop)``: count of the selected class among estimation samples [start, stop)."""

_lower = lru_cache(maxsize=1 << 16)(lower_confidence_bound)
_upper = lru_cache(maxsize=1 << 16)(upper_confidence_bound)


def look_schedule(cap: int, first: int = DEFAULT_FIRST_LOOK, ratio: float = DEFAULT_LOOK_RATIO) -> tuple[int, ...]:
    """Looks ``first``, then each the previous times ``ratio`` (rounded up), then ``cap``; a look is kept
    only below cap / sqrt(ratio), so the last step is never a sliver (just ``(cap,)`` if first is that
    close to the cap or above it). ``ratio`` 2 doubles: 100, 200, ..., 51,200, 100,000."""
    cap = check_count(cap, "N")
    n = check_count(first, "first look")
    ratio = check_look_ratio(ratio)
    looks = []
    while n * math.sqrt(ratio) < cap:
        looks.append(n)
        n = max(n + 1, math.ceil(n * ratio - 1e-9))
    return tuple(looks) + (cap,)


def check_look_ratio(ratio: float) -> float:
    if not (isinstance(ratio, (int, float)) and math.isfinite(ratio) and 1.0 < ratio <= 16.0):
        raise ValueError(f"look ratio must be a number in (1, 16], got {ratio!r}")
    return float(ratio)


def check_final_share(share: float | None) -> float | None:
    if share is not None and not (isinstance(share, (int, float)) and math.isfinite(share) and 0.0 < share < 1.0):
        raise ValueError(f"final share must be a number in (0, 1), got {share!r}")
    return None if share is None else float(share)


@dataclass(frozen=True)
class Schedule:
    """Looks (sample counts, strictly increasing) and the lower/upper bound level at each look.

    Build sound schedules with :func:`union_bound_schedule`; the constructor checks only the shape
    (a test builds the unsound "full alpha at every look" schedule with it)."""

    looks: tuple[int, ...]
    levels: tuple[float, ...]

    def __post_init__(self):
        if not self.looks or len(self.looks) != len(self.levels):
            raise ValueError(f"need one level per look, got {len(self.looks)} looks and {len(self.levels)} levels")
        if any(b <= a for a, b in zip(self.looks, self.looks[1:])) or self.looks[0] < 1:
            raise ValueError(f"looks must be positive and strictly increasing, got {self.looks}")
        for level in self.levels:
            check_alpha(level, "look level")

    @property
    def cap(self) -> int:
        return self.looks[-1]

    def max_radius(self, sigma: float) -> float:
        """Largest radius this schedule can certify: every sample a hit, at the final look (0.0 if
        even that cannot certify, e.g. a cap of a few samples)."""
        return _radius(check_sigma(sigma), _lower(self.cap, self.cap, self.levels[-1])) or 0.0


def union_bound_schedule(cap: int, alpha: float, first: int = DEFAULT_FIRST_LOOK,
                         ratio: float = DEFAULT_LOOK_RATIO, final_share: float | None = DEFAULT_FINAL_SHARE) -> Schedule:
    """The sound schedule: :func:`look_schedule` looks, levels summing to alpha.

    ``final_share`` s: the last look (the cap) gets s * alpha and the J - 1 earlier looks (1 - s) * alpha /
    (J - 1) each; at least the uniform alpha / J is kept for the cap (s is raised to 1 / J if below it), so
    the cap's level is the largest. ``None``: alpha / J at every look. One look: alpha (Cohen's CERTIFY)."""
    alpha = check_alpha(alpha)
    share = check_final_share(final_share)
    looks = look_schedule(cap, first, ratio)
    j = len(looks)
    if j == 1:
        return Schedule(looks, (alpha,))
    if share is None or share <= 1.0 / j:
        return Schedule(looks, (alpha / j,) * j)
    return Schedule(looks, ((1.0 - share) * alpha / (j - 1),) * (j - 1) + (share * alpha,))


@dataclass(frozen=True)
class StopPolicy:
    """What answer matters.

    ``target_radius`` R: the decision "certified at R?" (stop once decided either way). Without it,
    the radius itself, up to ``radius_tol``, or (with ``radius_grid`` g) up to the multiples of g it
    passes. ``enough_radius``: any radius beyond it is worth nothing
    (min-aware dual: the other stage caps the final min); the run stops once it is reached, and
    otherwise keeps improving the radius as without a target."""

    target_radius: float | None = None
    radius_tol: float = DEFAULT_RADIUS_TOL
    enough_radius: float | None = None
    radius_grid: float | None = None
    projection_level: float | None = DEFAULT_PROJECTION_LEVEL

    def __post_init__(self):
        for name, value in (("target radius", self.target_radius), ("radius tolerance", self.radius_tol),
                            ("enough radius", self.enough_radius)):
            if value is not None and not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        if self.radius_grid is not None and not (math.isfinite(self.radius_grid) and self.radius_grid > 0):
            raise ValueError(f"radius grid step must be a finite number > 0, got {self.radius_grid!r}")
        if self.projection_level is not None and not (math.isfinite(self.projection_level)
                                                      and 0.0 < self.projection_level < 0.5):
            raise ValueError(f"projection level must be a number in (0, 0.5), got {self.projection_level!r}")

    def within(self, radius: float) -> "StopPolicy":
        """This policy for a stage whose radius matters only up to ``radius`` (a target above it is lowered to it)."""
        radius = max(float(radius), 0.0)
        target = None if self.target_radius is None else min(self.target_radius, radius)
        enough = radius if self.enough_radius is None else min(self.enough_radius, radius)
        return StopPolicy(target, self.radius_tol, enough, self.radius_grid, self.projection_level)

    @property
    def stop_radius(self) -> float | None:
        """The radius at which the run stops as soon as it is certified (target or enough, the smaller)."""
        values = [v for v in (self.target_radius, self.enough_radius) if v is not None]
        return min(values) if values else None


@dataclass(frozen=True)
class SequentialCertificate(Certificate):
    """A :class:`~experts.stats.Certificate` (``n`` = estimation samples used, ``count`` = hits among
    them, ``p_lower`` = the best lower bound over the looks made) plus how the run stopped."""

    p_upper: float = 1.0
    looks: int = 1
    stop: str = STOP_CAP


@lru_cache(maxsize=1 << 16)
def _radius(sigma: float, p_lower: float) -> float | None:
    """Certified radius of a lower bound, or None below 1/2 (abstain)."""
    return certified_radius(sigma, p_lower) if p_lower >= 0.5 else None


def stop_rule(*, sigma: float, best: float, upper: float, reach: float, last: bool, policy: StopPolicy,
              projected: float = 1.0) -> str | None:
    """The first stop rule that fires (see the module docstring), or None to draw the next round.

    ``best`` is the best lower bound so far, ``upper`` this look's upper bound, ``reach`` the final
    look's lower bound if every remaining sample were a hit, ``projected`` the final look's lower bound
    if the remaining samples hit at the policy's projection bound (grid rule only; 1.0 = not used)."""
    target, enough = policy.target_radius, policy.stop_radius
    radius, reach_radius = _radius(sigma, best), _radius(sigma, reach)
    threshold = 0.5 if target is None else max(0.5, float(ndtr(target / sigma)))
    if enough is not None and radius is not None and radius >= enough:
        return STOP_TARGET
    if upper < threshold:
        return STOP_FUTILE
    if last:
        return STOP_CAP
    if reach_radius is None or reach <= best or (target is not None and reach_radius < target):
        return STOP_UNREACHABLE
    worth = reach_radius if enough is None else min(reach_radius, enough)
    step = policy.radius_grid
    if radius is None and target is None and step is not None:  # r = 0 is the grid point at stake
        return STOP_FUTILE if projected < 0.5 else None
    if target is not None or radius is None:
        return None
    if step is not None:
        next_point = (math.floor(radius / step) + 1) * step
        needed = float(ndtr(next_point / sigma))
        return STOP_GRID if next_point > worth or upper < needed or projected < needed else None
    return STOP_TOLERANCE if worth <= radius + policy.radius_tol else None


def certify_sequential(guess: int, draw: Draw, *, sigma: float, schedule: Schedule,
                       policy: StopPolicy = StopPolicy()) -> SequentialCertificate:
    """Sequential CERTIFY steps 2-5 for the selected class ``guess``.

    Draws estimation samples up to each look of ``schedule`` in turn and stops by :func:`stop_rule`.
    With probability at least 1 - sum(schedule.levels) over the estimation samples, if the result does
    not abstain, the smoothed classifier predicts ``guess`` everywhere within ``radius`` of the input.
    """
    sigma = check_sigma(sigma)
    count, drawn, best, final = 0, 0, 0.0, schedule.levels[-1]
    for j, (n_j, level) in enumerate(zip(schedule.looks, schedule.levels)):
        count += int(draw(drawn, n_j))
        drawn = n_j
        best = max(best, _lower(count, n_j, level))
        upper = _upper(count, n_j, level)
        reach = _lower(count + schedule.cap - n_j, schedule.cap, final)
        projected = 1.0
        if policy.radius_grid is not None and policy.projection_level is not None and n_j < schedule.cap:
            rate = _upper(count, n_j, policy.projection_level)
            projected = _lower(count + math.floor(rate * (schedule.cap - n_j)), schedule.cap, final)
        stop = stop_rule(sigma=sigma, best=best, upper=upper, reach=reach, last=j == len(schedule.looks) - 1,
                         policy=policy, projected=projected)
        if stop is not None:
            break
    radius = _radius(sigma, best)
    prediction = ABSTAIN if radius is None else int(guess)
    return SequentialCertificate(prediction, radius or 0.0, best, count, drawn, upper, j + 1, stop)
