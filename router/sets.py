"""Set-valued router certificates: a second proof for the same routed classifier.

Dual CERTIFY (:mod:`router.dual`) certifies the routed classifier h(x') = f_{g(x')}(x'), where g is the
smoothed router and f_k the smoothed experts, with min(R_sigma, R_c): R_sigma keeps g(x') on the one
chosen expert. Where the router hesitates between experts, R_sigma is small (or the router abstains)
although every expert it hesitates between may certify the same class far out. This module certifies
the *same* h with a set of experts instead:

* **Claim.** If g(x') lies in a set S of experts for every ||x' - x|| < R_S, and every expert k in S
  certifies one class c with radius R_k, then h(x') = c for every ||x' - x|| < min(R_S, min_k R_k).
* **R_S.** Let p_out(x') be the probability that the router's base classifier lands outside S under
  noise N(0, sigma_e^2 I) at x'. If p_out(x') < 1 / (|S| + 1), then the members of S hold more than
  |S| / (|S| + 1) in all, so one of them holds more than 1 / (|S| + 1) > p_out(x') >= every outsider's
  probability, and the argmax g(x') is in S. Cohen et al.'s Lemma (Phi^-1 of a smoothed probability is
  1/sigma_e-Lipschitz) gives p_out(x') <= Phi(Phi^-1(U) + ||x' - x|| / sigma_e) for an upper bound
  U >= p_out(x), hence R_S = sigma_e * (Phi^-1(1 / (|S| + 1)) - Phi^-1(U)); certified when R_S >= 0.
  With |S| = 1 this is Cohen's radius sigma_e * Phi^-1(p_lower) (U = 1 - p_lower), and S = every expert
  needs no bound at all (R_S is infinite).
* **Choosing S** (:func:`set_members`): the router's top expert on its selection samples, plus every
  expert whose share of those N0 samples is at least ``tau``. The choice reads the selection samples
  only, so the estimation samples that bound p_out are independent of it (as the class is chosen in
  CERTIFY). ``tau`` > 1 never adds an expert: the rows are then exactly dual CERTIFY's.
* **Failure probability.** One router bound at level beta (U = 1 - the Clopper-Pearson lower bound of
  P(in S) from the estimation counts), and each of the |S| experts certified at alpha / |S| on its own
  noise streams: by the union bound, the certificate is wrong with probability <= beta + alpha. Given
  the router's selection samples (which fix S), each expert's certificate is a CERTIFY on fresh samples;
  as in :mod:`router.dual`, no independence between the stages is needed.
* **Cost.** An image with |S| > 1 runs |S| expert certifications instead of one.

Tests: ``tests/router/test_sets.py`` checks the claim's statistics against exact smoothed probabilities
of a linear router along one direction, and shows that the naive threshold P(in S) > 1/2 fails there.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
from scipy.stats import norm

from dualrs_route.experts.stats import ABSTAIN, Certificate, check_alpha, lower_confidence_bound


def check_tau(tau: float) -> float:
    tau = float(tau)
    if not (math.isfinite(tau) and tau > 0):
        raise ValueError(f"--router-sets must be a selection share > 0 (above 1: never a set), got {tau}")
    return tau


def set_members(selection: np.ndarray, tau: float) -> np.ndarray:
    """bool [K]: the top expert of the router's selection counts (ties: lowest index, as CERTIFY) and
    every expert with at least ``tau`` of the selection samples."""
    selection = np.asarray(selection, dtype=np.int64)
    members = selection >= check_tau(tau) * selection.sum()
    members[int(np.argmax(selection))] = True
    return members


def set_radius(count_in: int, n: int, size: int, num_experts: int, beta: float, sigma_e: float) -> tuple[float, float]:
    """(lower bound of P(router in S), R_S) from ``count_in`` of ``n`` estimation samples inside S of
    ``size`` experts out of ``num_experts``, at level ``beta``. R_S is -1 where S is not certified and
    infinite where S holds every expert (the lower bound is then 1)."""
    if size >= num_experts:
        return 1.0, math.inf
    lower = lower_confidence_bound(int(count_in), int(n), check_alpha(beta, "beta"))
    threshold = size / (size + 1.0)
    if lower < threshold:
        return lower, -1.0
    if lower >= 1.0:
        return lower, math.inf
    return lower, float(sigma_e * (norm.ppf(1.0 / (size + 1.0)) + norm.ppf(lower)))


@dataclass(frozen=True)
class SetOutcome:
    """The set certificate of one input: class and radius (ABSTAIN, 0.0 when it abstains), the members,
    the router's bound and radius, and the member experts' certificates (in member order; None past
    the first one that abstained)."""

    prediction: int
    radius: float
    members: tuple[int, ...]
    p_router_lower: float
    radius_router: float
    expert_certificates: tuple[Certificate | None, ...]

    @property
    def binding(self) -> int:
        """The position in ``members`` of the expert with the smallest radius (the first abstaining one)."""
        radii = [c.radius if c is not None and not c.abstained else -1.0 for c in self.expert_certificates]
        return int(np.argmin(radii))


def certify_set(members: np.ndarray, count_in: int, n: int, *, beta: float, alpha: float, sigma_e: float,
                expert: Callable[[int, float], Certificate]) -> SetOutcome:
    """The set certificate from the router's members and estimation count inside them.

    ``expert(k, level)`` certifies expert k at ``level`` (here alpha / |S|). Abstains when S is not
    certified, when any member abstains, or when the members certify different classes."""
    chosen = tuple(int(k) for k in np.flatnonzero(members))
    p_router, r_router = set_radius(count_in, n, len(chosen), len(members), beta, sigma_e)
    if r_router < 0:
        return SetOutcome(ABSTAIN, 0.0, chosen, p_router, -1.0, ())
    level = check_alpha(alpha) / len(chosen)
    certificates: list[Certificate | None] = []
    for k in chosen:
        certificate = expert(k, level)
        certificates.append(certificate)
        if certificate.abstained:
            break
    certificates += [None] * (len(chosen) - len(certificates))
    classes = {c.prediction for c in certificates if c is not None}
    if any(c is None or c.abstained for c in certificates) or len(classes) != 1:
        return SetOutcome(ABSTAIN, 0.0, chosen, p_router, r_router, tuple(certificates))
    radius = min(r_router, min(c.radius for c in certificates))
    return SetOutcome(classes.pop(), float(radius), chosen, p_router, r_router, tuple(certificates))


def set_guarantee(tau: float) -> str:
    """The guarantee text's addition for set rows (sidecars of certify and compose)."""
    return (f"; router sets (tau = {tau:g}): a row certified with a set S of experts (its members column) holds by "
            "R_S from P(router outside S) < 1/(|S|+1) at beta and each member at alpha/|S|, the same union bound")


def format_members(members) -> str:
    """The ``members`` column: expert indices joined by '+' (e.g. ``1+2``)."""
    return "+".join(str(int(k)) for k in members)


def simulate_sets(scores, experts, offsets, *, alpha: float, beta: float, tau: float) -> dict:
    """:func:`router.calibrate.simulate` with set certificates: the rows ``certify --router --router-sets
    TAU`` gives with these noise streams (router scores, and each expert's own certificate counts).

    Images whose selection picks one expert keep dual CERTIFY's row; the others get
    :func:`certify_set`, each member re-derived at alpha / |S| from its counts. Adds ``members`` (a
    tuple of expert indices per image) to simulate's arrays; on set rows ``expert``, ``sigma`` and the
    ``*_expert`` fields are the binding member's (the smallest radius), the ``*_router`` fields R_S,
    the lower bound of P(in S) and the count inside S."""
    from .calibrate import bound_tables, routed_counts, simulate

    tau = check_tau(tau)
    out = simulate(scores, experts, offsets, alpha=alpha, beta=beta)
    offsets = np.asarray(offsets, dtype=np.float32)
    select = routed_counts(scores.select, offsets)
    estimate = routed_counts(scores.estimate, offsets)
    n = scores.estimate.shape[1]
    out["members"] = [(int(np.argmax(s)),) for s in select]
    for i in range(len(select)):
        members = set_members(select[i], tau)
        if members.sum() == 1:
            continue
        chosen = tuple(int(k) for k in np.flatnonzero(members))

        def member(k: int, level: float, i=i) -> Certificate:
            e = experts[k]
            p_e, r_e = bound_tables(e.n, level, e.sigma)
            count = int(e.count[i])
            ok = e.guess[i] != ABSTAIN and r_e[count] >= 0
            return Certificate(int(e.guess[i]) if ok else ABSTAIN, float(r_e[count]) if ok else 0.0,
                               float(p_e[count]), count, int(e.n))

        result = certify_set(members, int(estimate[i][members].sum()), n, beta=beta, alpha=alpha,
                             sigma_e=scores.sigma, expert=member)
        out["members"][i] = chosen
        out["n_router"][i] = int(estimate[i][members].sum())
        out["p_router_lower"][i] = result.p_router_lower
        if result.radius_router < 0:
            out["expert"][i], out["radius_router"][i], out["predict"][i] = ABSTAIN, 0.0, ABSTAIN
            out["radius_expert"][i], out["p_expert_lower"][i], out["n_expert"][i] = np.nan, np.nan, -1
            out["sigma"][i], out["radius"][i] = np.nan, 0.0
            continue
        b = result.binding
        cert = result.expert_certificates[b]
        out["expert"][i], out["radius_router"][i], out["predict"][i] = chosen[b], result.radius_router, result.prediction
        out["radius_expert"][i] = cert.radius
        out["p_expert_lower"][i], out["n_expert"][i] = cert.p_lower, cert.count
        out["sigma"][i], out["radius"][i] = experts[chosen[b]].sigma, result.radius
    out["correct"] = (out["predict"] == scores.label).astype(np.int64)
    return out
