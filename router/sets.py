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
* **Two proofs per set row** (:func:`certify_set`). The row keeps dual CERTIFY's own proof too (the top
  expert alone: min(R_top, R_c)), and reports the larger of the two radii. Bounds: the router's for the
  top expert and for S at beta / 2 each, and each of the |S| members certified at alpha / |S| on its own
  noise streams. By the union bound all of them hold with probability >= 1 - beta - alpha, and then both
  proofs hold, so the larger radius does. Given the router's selection samples (which fix S and the top
  expert), each bound is a Clopper-Pearson bound on fresh samples; as in :mod:`router.dual`, no
  independence between the stages is needed. A row whose selection gives one expert is dual CERTIFY's
  row, at beta and alpha.
* **Cost.** A set row runs |S| expert certifications instead of one.

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
    """The certificate of one set row: class and radius (ABSTAIN, 0.0 when it abstains), the members,
    which proof gave the radius (``proof``: "set", or "single" for the top expert alone), that proof's
    router bound and radius (-1 where neither router bound certified), and the member experts'
    certificates (in member order; None past the point where neither proof could still certify)."""

    prediction: int
    radius: float
    members: tuple[int, ...]
    proof: str
    p_router_lower: float
    radius_router: float
    count_router: int
    expert_certificates: tuple[Certificate | None, ...]

    @property
    def binding(self) -> int:
        """The position in ``members`` of the expert whose certificate the row reports: the top expert for
        the "single" proof, else the member with the smallest radius (the first abstaining one)."""
        if self.proof == "single":
            return 0
        radii = [c.radius if c is not None and not c.abstained else -1.0 for c in self.expert_certificates]
        return int(np.argmin(radii))


def certify_set(members: np.ndarray, top: int, count_top: int, count_in: int, n: int, *, beta: float, alpha: float,
                sigma_e: float, expert: Callable[[int, float], Certificate]) -> SetOutcome:
    """The certificate of a row whose router selection gave a set S (``members``, with ``top`` in it).

    Two proofs, each valid when all of its bounds hold, with every bound at its share of one union
    bound: the router's bound for ``top`` alone (``count_top`` of ``n``) and for S (``count_in``) at
    beta / 2 each, and each member certified at alpha / |S| by ``expert(k, level)``. The "single" proof is
    dual CERTIFY's min(R_top, R_c(top)); the "set" proof is min(R_S, every member's radius), all members
    agreeing. Both hold at once with probability >= 1 - beta - alpha, so the larger radius does too
    (ties: "single"). Abstains when neither proof certifies."""
    chosen = tuple(int(k) for k in np.flatnonzero(members))
    if top not in chosen or len(chosen) < 2:
        raise ValueError(f"a set row needs >= 2 members including the top expert {top}, got {chosen}")
    order = (top,) + tuple(k for k in chosen if k != top)
    half = check_alpha(beta, "beta") / 2.0
    p_one, r_one = set_radius(count_top, n, 1, len(members), half, sigma_e)
    p_set, r_set = set_radius(count_in, n, len(chosen), len(members), half, sigma_e)
    if r_one < 0 and r_set < 0:
        return SetOutcome(ABSTAIN, 0.0, order, "set", p_set, -1.0, int(count_in), ())
    level = check_alpha(alpha) / len(chosen)
    certificates: list[Certificate | None] = []
    for k in order:
        certificate = expert(k, level)
        certificates.append(certificate)
        if certificate.abstained or r_set < 0:  # neither proof gains from more members
            break
    certificates += [None] * (len(order) - len(certificates))
    first = certificates[0]
    single = min(r_one, first.radius) if r_one >= 0 and not first.abstained else -1.0
    agree = all(c is not None and not c.abstained and c.prediction == first.prediction for c in certificates)
    joint = min(r_set, min(c.radius for c in certificates)) if r_set >= 0 and agree else -1.0
    if single < 0 and joint < 0:
        proof = "single" if r_one >= 0 else "set"
        p, r, count = (p_one, r_one, count_top) if proof == "single" else (p_set, r_set, count_in)
        return SetOutcome(ABSTAIN, 0.0, order, proof, p, r, int(count), tuple(certificates))
    if single >= joint:
        return SetOutcome(first.prediction, float(single), order, "single", p_one, r_one, int(count_top),
                          tuple(certificates))
    return SetOutcome(first.prediction, float(joint), order, "set", p_set, r_set, int(count_in), tuple(certificates))


def set_guarantee(tau: float) -> str:
    """The guarantee text's addition for set rows (sidecars of certify and compose)."""
    return (f"; router sets (tau = {tau:g}): on a row with a set S of experts (members column) the router's bounds "
            "for the top expert and for S are at beta/2 each and each member at alpha/|S|; the row reports the larger "
            "of the top expert's dual radius and min(R_S, every member's radius): the same union bound")


def format_members(members) -> str:
    """The ``members`` column: expert indices joined by '+' (e.g. ``1+2``)."""
    return "+".join(str(int(k)) for k in members)
