"""Dual randomized smoothing in routing form (Sun, Mao and Vechev, ICLR 2026).

A *router* is a smoothed classifier, with its own noise sigma_e, whose K classes are
K expert RS classifiers. For one input x:

1. Router stage: Cohen's CERTIFY on the router (sigma_e, budget N0_r/N_r, failure
   probability beta) selects expert k with radius R_sigma, or abstains.
2. Expert stage: Cohen's CERTIFY on expert k (sigma_k, budget N0/N, failure
   probability alpha) gives class c with radius R_c, or abstains.
3. Result: class c with radius min(R_sigma, R_c). With probability at least
   1 - alpha - beta (union bound; Theorem 4.2 of the paper) the routed smoothed
   classifier x' -> g_{k(x')}(x') predicts c on the whole L2 ball of that radius.
   Either stage abstaining means the result abstains.

**Router sets** (``DualCertifier(..., set_tau=TAU)``, ``certify --router-sets``): where the router's
selection gives several experts a share >= TAU, the same routed classifier is also certified with
that set of experts (:mod:`router.sets`, its own guarantee and proof) and the larger radius kept.

**Shared noise** (``DualCertifier(..., share_noise=True)``, ``certify --share-noise``). Where the routed
expert's sigma equals the router's sigma_e, the expert stage reads the router stage's noisy inputs
instead of its own streams: its selection the router's selection stream (ROUTER_SELECT), its
estimation the router's estimation stream (ROUTER_ESTIMATE), and the unit-noise blocks the router
drew are kept in memory (:func:`experts.noise.sharing`) and copied, not drawn again. Why the
guarantee stays 1 - alpha - beta: let A be the event that the router's certificate is wrong
(P[A] <= beta, the router stage is unchanged) and, for each expert k, B_k the event that expert k's
certificate, computed from guess_k (its selection on ROUTER_SELECT) and the ROUTER_ESTIMATE samples,
is wrong. The routed k* and every guess_k are functions of the ROUTER_SELECT noise only, and the
ROUTER_ESTIMATE noise is independent of it, so given the ROUTER_SELECT noise, B_k is a Clopper-Pearson
bound on fresh i.i.d. samples for a fixed class: P[B_k | ROUTER_SELECT] <= alpha (sequential: every
look of the fixed schedule, whatever stops it, including the router's counts on the same samples).
So P[B_k*] = E[sum_k 1{k* = k} P[B_k | ROUTER_SELECT]] <= alpha, and a wrong routed certificate lies
in A or B_k*: probability <= alpha + beta, a union bound that needs no independence between the
stages. The router abstaining (a function of ROUTER_ESTIMATE) only removes results. What would be
wrong: selecting the expert's class on the same samples its bound is computed from (a test shows
that variant failing the oracle), or sharing PREDICT's noise, whose test would then run on the samples
that chose the expert; so PREDICT never shares.
"""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from dualrs_route.experts.errors import IncompatibleModelsError
from dualrs_route.experts.folders import ModelFolder, check_listed_reference, load_folder
from dualrs_route.export.engines import make_counter
from dualrs_route.experts.noise import DEFAULT_SHARE_BYTES, Stage, sharing
from dualrs_route.experts.smoothing import SmoothedClassifier
from dualrs_route.experts.sequential import Schedule, SequentialCertificate, StopPolicy
from dualrs_route.experts.stats import ABSTAIN, Certificate, certify_from_counts, check_alpha

from .sets import certify_set, check_tau, set_members


@dataclass(frozen=True)
class RoutedCertificate:
    """Outcome of dual certification: the final class and radius, and both stages' certificates.

    ``expert`` is the routed expert's index, or ABSTAIN when the router abstained
    (then ``expert_certificate`` is None).
    """

    prediction: int
    radius: float
    expert: int
    router_certificate: Certificate | None
    expert_certificate: Certificate | None
    members: tuple[int, ...] | None = None  # with router sets: the set S, top expert first (router/sets.py)
    proof: str | None = None  # with router sets: "dual" (one expert selected), "single" or "set"

    @property
    def abstained(self) -> bool:
        return self.prediction == ABSTAIN


def min_aware_certify(router_guess: int, route: Callable[[StopPolicy], SequentialCertificate],
                      expert: Callable[[int, StopPolicy], SequentialCertificate], expert_reach: Sequence[float],
                      policy: StopPolicy = StopPolicy()) -> RoutedCertificate:
    """Min-aware sequential dual certification, given the router's selected expert ``router_guess``.

    ``route(policy)`` runs the router's sequential estimation for ``router_guess``; ``expert(k, policy)``
    runs expert k's sequential CERTIFY (selection and estimation); ``expert_reach[k]`` is the largest
    radius expert k can certify within its cap (:meth:`Schedule.max_radius`). The router stage stops
    once R_sigma reaches ``expert_reach[router_guess]`` (more of R_sigma cannot raise the min); the
    expert stage stops once R_c reaches R_sigma (:meth:`StopPolicy.within`). Short of those radii each
    stage keeps improving its radius by its own stop rules. A ``policy`` target radius R is lowered to
    those radii for each stage (the final min cannot be certified beyond them).

    Guarantee: with probability >= 1 - alpha - beta the result's class is predicted by the routed
    smoothed classifier on the whole ball of the returned radius min(R_sigma, R_c). Proof: the router's
    certificate fails with probability <= beta for any stopping rule (the union bound over its looks,
    :mod:`experts.sequential`). The expert stage draws from its own streams, independent of the
    router's, so conditionally on the router's outcome (which fixes k and the expert's target) expert
    k's certificate fails with probability <= alpha, again for any stopping rule, hence also
    unconditionally. A union bound over the two stages gives alpha + beta; the stopping rules only
    decide how many samples are drawn. (The stages never share noisy inputs here.)
    """
    routed = route(policy.within(expert_reach[router_guess]))
    if routed.abstained:
        return RoutedCertificate(ABSTAIN, 0.0, ABSTAIN, routed, None)
    k = routed.prediction
    result = expert(k, policy.within(routed.radius))
    if result.abstained:
        return RoutedCertificate(ABSTAIN, 0.0, k, routed, result)
    return RoutedCertificate(result.prediction, min(routed.radius, result.radius), k, routed, result)


def split_alpha(total_alpha: float, alpha_router: float | None = None) -> tuple[float, float]:
    """Split the total failure probability into (alpha for the expert, beta for the router).

    Even split unless ``alpha_router`` (beta) is given; then the expert gets the rest.
    """
    total = check_alpha(total_alpha, "alpha")
    if alpha_router is None:
        return total / 2.0, total / 2.0
    beta = check_alpha(alpha_router, "alpha-router")
    if beta >= total:
        raise ValueError(f"--alpha-router ({beta}) must be smaller than the total --alpha ({total})")
    return total - beta, beta


def router_smoothed(counter, sigma: float) -> SmoothedClassifier:
    """A smoothed classifier over the router's counter, with the router's own noise streams."""
    return SmoothedClassifier(counter, sigma, select_stage=Stage.ROUTER_SELECT,
                              estimate_stage=Stage.ROUTER_ESTIMATE, predict_stage=Stage.ROUTER_PREDICT)


class DualCertifier:
    """Routes each input with a smoothed router, then certifies it with the chosen smoothed expert."""

    def __init__(self, router: SmoothedClassifier, experts: Sequence[SmoothedClassifier], *,
                 share_noise: bool = False, share_bytes: int = DEFAULT_SHARE_BYTES, set_tau: float | None = None):
        if router.num_classes != len(experts):
            raise IncompatibleModelsError(f"the router has {router.num_classes} outputs but {len(experts)} experts were given")
        if set_tau is not None and share_noise:
            raise ValueError("--router-sets and --share-noise cannot be combined")
        self.set_tau = None if set_tau is None else check_tau(set_tau)
        self.router = router
        self.experts = list(experts)
        self.share_noise = bool(share_noise)
        self.share_bytes = int(share_bytes)
        self.last_share = None  # the BlockCache of the last row that shared noise (hits/misses, for tests)
        # expert k reads the router's streams where sigma_k = sigma_e (the module docstring's argument)
        self._stage_experts = [
            SmoothedClassifier(e.counter, e.sigma, select_stage=Stage.ROUTER_SELECT,
                               estimate_stage=Stage.ROUTER_ESTIMATE, predict_stage=e.predict_stage)
            if self.share_noise and e.sigma == router.sigma else e for e in self.experts]

    @property
    def shares(self) -> bool:
        """Whether any expert reads the router's noise (``share_noise`` and some sigma_k = sigma_e)."""
        return any(a is not b for a, b in zip(self._stage_experts, self.experts))

    def _sharing(self):
        if not self.shares:
            return contextlib.nullcontext()
        return sharing(self.share_bytes)

    def certify(self, x: np.ndarray, *, n0: int, n: int, alpha: float, router_n0: int, router_n: int, beta: float,
                seed: int = 0, index: int = 0) -> RoutedCertificate:
        """Dual CERTIFY of one input; valid with probability >= 1 - alpha - beta (also with shared noise)."""
        with self._sharing() as cache:
            result = self._certify(x, n0=n0, n=n, alpha=alpha, router_n0=router_n0, router_n=router_n, beta=beta,
                                   seed=seed, index=index)
        self.last_share = cache
        return result

    def _certify(self, x, *, n0, n, alpha, router_n0, router_n, beta, seed, index) -> RoutedCertificate:
        if self.set_tau is not None:
            return self._certify_sets(x, n0=n0, n=n, alpha=alpha, router_n0=router_n0, router_n=router_n, beta=beta,
                                      seed=seed, index=index)
        routed = self.router.certify(x, n0=router_n0, n=router_n, alpha=beta, seed=seed, index=index)
        return self._routed_row(routed, x, n0=n0, n=n, alpha=alpha, seed=seed, index=index)

    def _routed_row(self, routed: Certificate, x, *, n0, n, alpha, seed, index, members=None,
                    proof=None) -> RoutedCertificate:
        """The row of a router certificate: the routed expert's CERTIFY and min(R_sigma, R_c), or abstain."""
        if routed.abstained:
            return RoutedCertificate(ABSTAIN, 0.0, ABSTAIN, routed, None, members, proof)
        expert = routed.prediction
        result = self._stage_experts[expert].certify(x, n0=n0, n=n, alpha=alpha, seed=seed, index=index)
        if result.abstained:
            return RoutedCertificate(ABSTAIN, 0.0, expert, routed, result, members, proof)
        return RoutedCertificate(result.prediction, min(routed.radius, result.radius), expert, routed, result,
                                 members, proof)

    def _certify_sets(self, x, *, n0, n, alpha, router_n0, router_n, beta, seed, index) -> RoutedCertificate:
        """Dual CERTIFY with set-valued router certificates (router/sets.py): the same draws as
        :meth:`_certify` (router selection and estimation streams, each expert's own streams); a row
        whose selection picks one expert is exactly dual CERTIFY's."""
        check_alpha(beta, "beta")
        selection = self.router.selection_counts(x, n0=router_n0, seed=seed, index=index)
        estimate = self.router.estimation_counts(x, n=router_n, seed=seed, index=index)
        members = set_members(selection, self.set_tau)
        top = int(np.argmax(selection))
        if members.sum() == 1:  # dual CERTIFY's row (no shared noise here: the constructor refuses it)
            routed = certify_from_counts(top, int(estimate[top]), int(router_n), self.router.sigma, beta)
            return self._routed_row(routed, x, n0=n0, n=n, alpha=alpha, seed=seed, index=index, members=(top,),
                                    proof="dual")
        count_in = int(estimate[members].sum())
        outcome = certify_set(members, top, int(estimate[top]), count_in, int(router_n), beta=beta, alpha=alpha,
                              sigma_e=self.router.sigma,
                              expert=lambda k, level: self.experts[k].certify(x, n0=n0, n=n, alpha=level, seed=seed,
                                                                              index=index))
        routed = Certificate(top if outcome.radius_router >= 0 else ABSTAIN, max(outcome.radius_router, 0.0),
                             outcome.p_router_lower, outcome.count_router, int(router_n))
        if outcome.radius_router < 0:
            return RoutedCertificate(ABSTAIN, 0.0, ABSTAIN, routed, None, outcome.members, outcome.proof)
        b = outcome.binding
        return RoutedCertificate(outcome.prediction, outcome.radius, outcome.members[b], routed,
                                 outcome.expert_certificates[b], outcome.members, outcome.proof)

    def certify_sequential(self, x: np.ndarray, *, n0: int, schedule: Schedule, router_n0: int,
                           router_schedule: Schedule, policy: StopPolicy = StopPolicy(), seed: int = 0,
                           index: int = 0) -> RoutedCertificate:
        """Min-aware sequential dual CERTIFY (:func:`min_aware_certify`); valid with probability
        >= 1 - sum(schedule.levels) - sum(router_schedule.levels) (also with shared noise)."""
        with self._sharing() as cache:
            guess = self.router.select(x, n0=router_n0, seed=seed, index=index)
            result = min_aware_certify(
                guess,
                lambda p: self.router.estimate_sequential(x, guess, schedule=router_schedule, policy=p, seed=seed,
                                                          index=index),
                lambda k, p: self._stage_experts[k].certify_sequential(x, n0=n0, schedule=schedule, policy=p,
                                                                       seed=seed, index=index),
                [schedule.max_radius(e.sigma) for e in self.experts], policy)
        self.last_share = cache
        return result

    def predict(self, x: np.ndarray, *, n: int, alpha: float, router_n: int, beta: float, seed: int = 0,
                index: int = 0) -> tuple[int, int]:
        """Dual PREDICT: route with PREDICT at level beta, then PREDICT with the expert at level alpha.

        Returns (prediction, expert); both ABSTAIN-able. With probability >= 1 - alpha - beta a
        non-abstaining prediction is the routed smoothed classifier's class at x.
        """
        expert, _ = self.router.predict(x, n=router_n, alpha=beta, seed=seed, index=index)
        if expert == ABSTAIN:
            return ABSTAIN, ABSTAIN
        prediction, _ = self.experts[expert].predict(x, n=n, alpha=alpha, seed=seed, index=index)
        return prediction, expert


def check_expert_set(experts: Sequence[ModelFolder], router: ModelFolder | None = None) -> list[str]:
    """Refuse sets that cannot be routed; return warnings (sigma_e below the largest expert sigma).

    Every expert must be of kind expert with the same num_classes and input_shape, the
    router's input_shape must match theirs and it must have one output per expert.
    """
    if not experts:
        raise IncompatibleModelsError("no experts given")
    for folder in experts:
        if folder.config.kind != "expert":
            raise IncompatibleModelsError(f"{folder.reference} is a {folder.config.kind}, not an expert")
    first = experts[0].config
    for folder in experts[1:]:
        cfg = folder.config
        if cfg.num_classes != first.num_classes:
            raise IncompatibleModelsError(
                f"experts disagree on num_classes: {experts[0].reference} has {first.num_classes}, "
                f"{folder.reference} has {cfg.num_classes}; all experts must classify the same classes")
        if cfg.input_shape != first.input_shape:
            raise IncompatibleModelsError(
                f"experts disagree on input_shape: {experts[0].reference} has {list(first.input_shape)}, "
                f"{folder.reference} has {list(cfg.input_shape)}")
    notes = []
    if router is not None:
        rcfg = router.config
        if rcfg.kind != "router":
            raise IncompatibleModelsError(f"{router.reference} is a {rcfg.kind}, not a router")
        if rcfg.num_classes != len(experts):
            raise IncompatibleModelsError(f"{router.reference} has {rcfg.num_classes} outputs but routes to "
                                          f"{len(experts)} experts")
        if rcfg.input_shape != first.input_shape:
            raise IncompatibleModelsError(f"{router.reference} takes input_shape {list(rcfg.input_shape)} but its "
                                          f"experts take {list(first.input_shape)}")
        note = sigma_e_note(rcfg.sigma, max(f.config.sigma for f in experts))
        if note:
            notes.append(note)
    return notes


def sigma_e_note(sigma_e: float, largest: float) -> str | None:
    """The warning for a router whose sigma_e is below the largest expert sigma (None otherwise).

    sigma_e >= max sigma_k is the paper's heuristic, not a soundness condition: any sigma_e gives a
    valid min(R_sigma, R_c) certificate. What a small sigma_e costs is the router stage's cap,
    sigma_e * Phi^-1(beta^(1/N)) with every router sample agreeing: 3.17 sigma_e at N = 10,000
    and 3.78 sigma_e at N = 100,000 (beta = 0.0005)."""
    if sigma_e >= largest:
        return None
    return (f"router sigma_e = {sigma_e:g} is below the largest expert sigma ({largest:g}): the certificate stays "
            f"valid, but the router stage caps every radius at about 3.2 * sigma_e = {3.2 * sigma_e:.2f} "
            f"(router N = 10,000; 3.8 * sigma_e at N = 100,000)")


def load_router_set(reference: str) -> tuple[ModelFolder, list[ModelFolder]]:
    """Load a router folder and every expert it lists (relative paths from the router's folder; a
    Hub router's paths must stay inside its snapshot, see :func:`check_listed_reference`).

    Validates the whole set before returning; warnings are emitted with :mod:`warnings`.
    """
    router = load_folder(reference, expected_kind="router")
    for ref in router.config.experts:
        check_listed_reference(router, ref)
    experts = [load_folder(ref, base_dir=router.path, expected_kind="expert") for ref in router.config.experts]
    for note in check_expert_set(experts, router):
        warnings.warn(note, stacklevel=2)
    return router, experts


def build_smoothed(folder: ModelFolder, *, router: bool = False, **engine_options) -> SmoothedClassifier:
    counter = make_counter(folder, **engine_options)
    if router:
        return router_smoothed(counter, folder.config.sigma)
    return SmoothedClassifier(counter, folder.config.sigma)
