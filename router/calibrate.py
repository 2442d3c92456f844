"""Router calibration: per-expert logit offsets chosen on held-out dual certificates.

A router's base classifier is ``argmax_k f_k(x)``. Adding fixed offsets ``b_k`` to its
logits, ``argmax_k f_k(x) + b_k``, is another deterministic base classifier, so Dual RS
stays valid for any ``b`` fixed before the test data are seen. The offsets move the
router's decision boundaries: a bias towards an expert makes the router choose it more
often and, where the router hesitated between two experts, more consistently, which
raises R_sigma. Which offsets are best depends on what the dual certificate gains or
loses per image, so they are chosen by simulating that certificate exactly:

1. :func:`collect_scores` stores the router's logits on every noisy copy of held-out
   images, from the same noise streams (seed, index, stage) that dual CERTIFY draws;
2. each expert's standalone certificate on the same images (a ``certify --expert`` TSV)
   supplies the expert stage: dual CERTIFY certifies the routed expert with the same
   streams as a standalone run with the same seed, so its counts are the same;
3. :func:`simulate` replays dual CERTIFY for any offsets (same float32 arithmetic as the
   engines, same Clopper-Pearson bounds), and :func:`fit_offsets` grid-searches the
   offsets with the highest held-out ACR.

The expert certificates are re-derived at the dual run's alpha from their counts, which
requires that alpha to be at most the one the TSV was certified at (a certificate that
abstains at alpha abstains at every smaller alpha).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from dualrs_route.experts.errors import DataError, ResumeMismatchError
from dualrs_route.experts.noise import NoiseKey, Stage
from dualrs_route.experts.stats import ABSTAIN, Certificate, check_alpha, lower_confidence_bound

from .labels import save_npz_atomic

SCORES_FORMAT = "dualrs-route router scores v1"


# ---------------------------------------------------------------------------------------------
# 1. Router scores: logits on every noisy copy of the router stage
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass
class ScoresJob:
    """What a process needs to score chunks of images with a router (picklable: Ray actors get a copy)."""

    folder: object  # the router's ModelFolder
    n0: int
    n: int
    seed: int
    batch: int = 400
    engine: str = "auto"
    device: str = "cpu"
    threads: int | None = None

    @property
    def folders(self) -> list:
        return [self.folder]

    def build(self) -> "ScoreChunk":
        """The chunk function, with the router's counter built without logit offsets."""
        from dualrs_route.export.engines import make_counter

        counter = make_counter(self.folder, engine=self.engine, device=self.device, batch_size=self.batch,
                               threads=self.threads, raw_logits=True)
        return ScoreChunk(counter, sigma=self.folder.config.sigma, n0=self.n0, n=self.n, seed=self.seed)


class ScoreChunk:
    """``(xs, idx) -> (select, estimate)``: a router's raw logits on one chunk's noisy copies."""

    def __init__(self, counter, *, sigma: float, n0: int, n: int, seed: int):
        if counter.logit_offsets is not None:
            raise DataError("router scores are the network's raw logits: build the counter with raw_logits=True")
        self.counter, self.sigma, self.n0, self.n, self.seed = counter, float(sigma), int(n0), int(n), int(seed)
        self.engines = counter.describe() if hasattr(counter, "describe") else type(counter).__name__

    def __call__(self, xs: np.ndarray, idx: Sequence[int]):
        select = self.counter.logits_many(xs, self.sigma, self.n0,
                                          keys=[NoiseKey(self.seed, i, Stage.ROUTER_SELECT) for i in idx])
        estimate = self.counter.logits_many(xs, self.sigma, self.n,
                                            keys=[NoiseKey(self.seed, i, Stage.ROUTER_ESTIMATE) for i in idx])
        return select, estimate


def collect_scores(counter, images_of: Callable[[Sequence[int]], np.ndarray], labels: Sequence[int],
                   indices: Sequence[int], *, sigma: float, n0: int, n: int, seed: int, out: str | os.PathLike,
                   settings: dict, chunk: int = 10, progress: Callable | None = None, source=None) -> Path:
    """Write the router's raw logits on its selection and estimation samples to ``out`` (.npz).

    ``counter`` is any :class:`~dualrs_route.experts.engine.NoisyCounter` built without logit
    offsets (``raw_logits=True``). Image ``indices[i]`` uses the noise streams (seed, index, ROUTER_SELECT /
    ROUTER_ESTIMATE) of dual CERTIFY. Work is saved every ``chunk`` images in ``out``.parts/,
    and a re-run with the same ``settings`` resumes there; the final file is written atomically.
    ``source`` (a ``labels.LocalChunks`` or ``distributed.RayChunks`` over a :class:`ScoresJob`;
    ``counter`` is then unused) computes the chunks elsewhere and yields them in order; this process writes every
    part, so the file is the same. The caller closes it.
    """
    if source is None:
        from .labels import LocalChunks

        source = LocalChunks(ScoreChunk(counter, sigma=sigma, n0=n0, n=n, seed=seed))
    out = Path(out)
    if out.exists():
        raise FileExistsError(f"{out} exists; delete it or choose another --out")
    parts = out.with_name(out.name + ".parts")
    meta = {"format": SCORES_FORMAT, "indices": [int(i) for i in indices], "sigma": float(sigma), "n0": int(n0),
            "n": int(n), "seed": int(seed), **settings}
    parts.mkdir(parents=True, exist_ok=True)
    meta_file = parts / "meta.json"
    if meta_file.exists():
        old = json.loads(meta_file.read_text())
        if old != json.loads(json.dumps(meta)):
            diffs = sorted(k for k in set(old) | set(meta) if old.get(k) != meta.get(k))
            raise ResumeMismatchError(f"{parts} holds scores with other settings ({', '.join(diffs)}); "
                                      f"delete it or choose another --out")
    else:
        meta_file.write_text(json.dumps(meta, indent=1) + "\n")
    groups = [list(indices[i:i + chunk]) for i in range(0, len(indices), chunk)]
    todo = [g for g in range(len(groups)) if not (parts / f"{g:06d}.npz").exists()]
    results = zip(todo, source.map(todo, lambda g: (images_of(groups[g]), groups[g])))
    iterator = progress(results, len(todo)) if progress else results
    for g, (select, estimate) in iterator:
        save_npz_atomic(parts / f"{g:06d}.npz", select=select, estimate=estimate)
    select, estimate = [], []
    for g in range(len(groups)):
        with np.load(parts / f"{g:06d}.npz") as part:
            select.append(part["select"])
            estimate.append(part["estimate"])
    save_npz_atomic(out, idx=np.asarray(indices, dtype=np.int64), label=np.asarray(labels, dtype=np.int64),
                     select=np.concatenate(select), estimate=np.concatenate(estimate),
                     meta=np.asarray(json.dumps(meta)))
    shutil.rmtree(parts)
    return out


@dataclass
class RouterScores:
    idx: np.ndarray        # int64 [m]
    label: np.ndarray      # int64 [m]
    select: np.ndarray     # float32 [m, n0, K]
    estimate: np.ndarray   # float32 [m, n, K]
    meta: dict

    @property
    def sigma(self) -> float:
        return float(self.meta["sigma"])


def load_scores(path: str | os.PathLike) -> RouterScores:
    try:
        with np.load(path) as data:
            meta = json.loads(str(data["meta"]))
            if meta.get("format") != SCORES_FORMAT:
                raise DataError(f"{path}: not a router scores file (format {meta.get('format')!r})")
            return RouterScores(data["idx"], data["label"], data["select"], data["estimate"], meta)
    except (OSError, KeyError, ValueError) as exc:
        raise DataError(f"{path}: cannot read router scores ({exc}); create it with `dualrs-route router-scores`") \
            from None


# ---------------------------------------------------------------------------------------------
# 2. The expert stage, from standalone expert certificates
# ---------------------------------------------------------------------------------------------

@dataclass
class ExpertStage:
    """One expert's standalone CERTIFY results on the scored images, re-derivable at any alpha <= its own."""

    path: str
    name: str
    sigma: float
    n: int
    alpha: float
    guess: np.ndarray   # int64 [m]: the certified class, ABSTAIN where the file abstained
    count: np.ndarray   # int64 [m]: the estimation count of the selected class
    metadata: dict


def load_expert_stage(path: str | os.PathLike, scores: RouterScores) -> ExpertStage:
    """Read a ``certify --expert`` TSV that covers every scored image, from the same seed
    (:func:`router.results.read_single_expert_results`: complete, fixed N, the expert's own sigma)."""
    from .results import read_single_expert_results

    table = read_single_expert_results(path, "the expert stage is replayed")
    meta, columns = table.metadata, table.columns
    settings = meta["settings"]
    if int(settings.get("seed", -1)) != int(scores.meta["seed"]):
        raise DataError(f"{path} used --seed {settings.get('seed')} but the router scores used seed "
                        f"{scores.meta['seed']}: dual CERTIFY draws both stages from one seed")
    row_of = {int(i): r for r, i in enumerate(table.idx)}
    missing_idx = [int(i) for i in scores.idx if int(i) not in row_of]
    if missing_idx:
        raise DataError(f"{path} lacks {len(missing_idx)} of the scored images (e.g. idx {missing_idx[:3]}); certify "
                        "the same --dataset/--split/--skip/--max")
    rows = np.array([row_of[int(i)] for i in scores.idx], dtype=np.int64)
    if not np.array_equal(table.label[rows], scores.label):
        raise DataError(f"{path}: labels differ from the router scores' labels: not the same images")
    name = table.expert[rows[0]].partition(":")[2] if table.expert else Path(path).stem
    return ExpertStage(path=str(path), name=name, sigma=float(columns["sigma"][0]), n=int(settings["N"]),
                       alpha=float(settings["alpha_expert"]), guess=table.predict[rows],
                       count=np.array([int(columns["n_expert"][r]) for r in rows], dtype=np.int64), metadata=meta)


_TABLES: dict = {}


def bound_tables(n: int, alpha: float, sigma: float) -> tuple[np.ndarray, np.ndarray]:
    """p_lower and radius (-1 where CERTIFY abstains) for every count 0..n, from the scalar functions
    that CERTIFY itself uses (so a simulated certificate equals a real one bit for bit)."""
    from dualrs_route.experts.stats import certified_radius

    key = (int(n), float(alpha), float(sigma))
    if key not in _TABLES:
        p = np.array([lower_confidence_bound(c, n, alpha) for c in range(n + 1)])
        r = np.array([certified_radius(sigma, q) if q >= 0.5 else -1.0 for q in p])
        _TABLES[key] = (p, r)
    return _TABLES[key]


# ---------------------------------------------------------------------------------------------
# 3. Replaying dual CERTIFY, and choosing offsets
# ---------------------------------------------------------------------------------------------

def expert_stage(e: ExpertStage, level: float, rows) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The expert stage of ``e`` on ``rows`` (indices or a mask), re-derived at ``level`` from its counts:
    (certified mask, radius (0 where not certified), p_lower, count)."""
    p_e, r_e = bound_tables(e.n, level, e.sigma)
    counts = e.count[rows]
    ok = (e.guess[rows] != ABSTAIN) & (r_e[counts] >= 0)
    return ok, np.where(ok, r_e[counts], 0.0), p_e[counts], counts


def expert_certificate(e: ExpertStage, level: float, i: int) -> Certificate:
    """Row ``i``'s CERTIFY outcome of ``e`` re-derived at ``level`` (:func:`expert_stage` of one row)."""
    (ok,), (radius,), (p_lower,), (count,) = expert_stage(e, level, [i])
    return Certificate(int(e.guess[i]) if ok else ABSTAIN, float(radius), float(p_lower), int(count), int(e.n))


def routed_counts(logits: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """int64 [m, K]: per image, the argmax counts of ``logits + offsets`` (float32, as the engines add them)."""
    k = logits.shape[-1]
    votes = np.argmax(logits + np.asarray(offsets, dtype=np.float32), axis=-1)
    return np.stack([(votes == c).sum(axis=1) for c in range(k)], axis=1).astype(np.int64)


def router_votes(scores: RouterScores, offsets, counts=None) -> tuple[np.ndarray, np.ndarray]:
    """(selection, estimation) vote counts, int64 [m, K]: ``counts`` where given, else those of ``logits + offsets``."""
    if counts is not None:
        select, estimate = (np.asarray(c, dtype=np.int64) for c in counts)
        if select.shape != scores.select.shape[::2] or estimate.shape != scores.estimate.shape[::2]:
            raise ValueError(f"vote counts of shape {select.shape}, {estimate.shape} for scores of "
                             f"{scores.select.shape}, {scores.estimate.shape}")
        return select, estimate
    offsets = np.asarray(offsets, dtype=np.float32)
    return routed_counts(scores.select, offsets), routed_counts(scores.estimate, offsets)


def simulate(scores: RouterScores, experts: Sequence[ExpertStage], offsets, *, alpha: float, beta: float,
             counts: tuple[np.ndarray, np.ndarray] | None = None) -> dict:
    """Dual CERTIFY of every scored image with the router's logits shifted by ``offsets``.

    Router stage at level ``beta`` (guess from the selection samples, count from the
    estimation samples), expert stage at level ``alpha`` re-derived from each expert's counts.
    ``counts`` (selection and estimation vote counts, int64 [m, K] each) replaces the votes of
    ``logits + offsets`` for a search that derives them faster from the logits itself.
    Returns per-image arrays named like the certify TSV columns (``expert``: index or ABSTAIN).
    """
    check_alpha(alpha)
    check_alpha(beta, "beta")
    k = scores.select.shape[-1]
    if len(experts) != k:
        raise DataError(f"the router has {k} outputs but {len(experts)} expert result files were given")
    for e in experts:
        if alpha > e.alpha * (1 + 1e-12):
            raise DataError(f"{e.path} was certified at alpha = {e.alpha:g}; it cannot supply an expert stage at "
                            f"the larger alpha = {alpha:g}")
    select, estimate = router_votes(scores, offsets, counts)
    guess = select.argmax(axis=1)
    n_router = estimate[np.arange(len(guess)), guess]
    p_router, r_router = bound_tables(scores.estimate.shape[1], beta, scores.sigma)
    routed = r_router[n_router] >= 0
    m = len(guess)
    out = {"expert": np.where(routed, guess, ABSTAIN), "n_router": n_router, "p_router_lower": p_router[n_router],
           "radius_router": np.where(routed, r_router[n_router], 0.0), "predict": np.full(m, ABSTAIN),
           "radius_expert": np.full(m, np.nan), "p_expert_lower": np.full(m, np.nan),
           "n_expert": np.full(m, -1), "sigma": np.full(m, np.nan)}
    for j, e in enumerate(experts):
        rows = routed & (guess == j)
        ok, radius, p_lower, counts = expert_stage(e, alpha, rows)
        out["predict"][rows] = np.where(ok, e.guess[rows], ABSTAIN)
        out["radius_expert"][rows] = radius
        out["p_expert_lower"][rows] = p_lower
        out["n_expert"][rows] = counts
        out["sigma"][rows] = e.sigma
    certified = out["predict"] != ABSTAIN
    out["radius"] = np.where(certified, np.minimum(out["radius_router"], np.nan_to_num(out["radius_expert"])), 0.0)
    out["correct"] = (out["predict"] == scores.label).astype(np.int64)
    return out


def simulate_sets(scores, experts, offsets, *, alpha: float, beta: float, tau: float, counts=None) -> dict:
    """:func:`simulate` with set rows: the rows ``certify --router --router-sets TAU`` gives
    with these noise streams (router scores, and each expert's own certificate counts).

    Images whose selection gives one expert keep dual CERTIFY's row; the others get
    :func:`router.sets.certify_set`, each member re-derived at alpha / |S| from its counts. Adds ``members`` (a
    tuple of expert indices per image, the top one first) and ``proof`` ("dual", "single" or "set") to
    simulate's arrays; on set rows ``expert``, ``sigma`` and the ``*_expert`` fields are the reported
    member's (:attr:`router.sets.SetOutcome.binding`), the ``*_router`` fields those of the proof that gave the radius.
    ``counts``: as in :func:`simulate`."""
    from .sets import certify_set, check_tau, set_members

    tau = check_tau(tau)
    select, estimate = router_votes(scores, offsets, counts)
    out = simulate(scores, experts, offsets, alpha=alpha, beta=beta, counts=(select, estimate))
    n = scores.estimate.shape[1]
    out["members"] = [(int(np.argmax(s)),) for s in select]
    out["proof"] = ["dual"] * len(select)
    for i in range(len(select)):
        members = set_members(select[i], tau)
        if members.sum() == 1:
            continue

        def member(k: int, level: float, i=i) -> Certificate:
            return expert_certificate(experts[k], level, i)

        top = int(np.argmax(select[i]))
        result = certify_set(members, top, int(estimate[i][top]), int(estimate[i][members].sum()), n, beta=beta,
                             alpha=alpha, sigma_e=scores.sigma, expert=member)
        out["members"][i], out["proof"][i] = result.members, result.proof
        out["n_router"][i], out["p_router_lower"][i] = result.count_router, result.p_router_lower
        if result.radius_router < 0:
            out["expert"][i], out["radius_router"][i], out["predict"][i] = ABSTAIN, 0.0, ABSTAIN
            out["radius_expert"][i], out["p_expert_lower"][i], out["n_expert"][i] = np.nan, np.nan, -1
            out["sigma"][i], out["radius"][i] = np.nan, 0.0
            continue
        b = result.binding
        cert = result.expert_certificates[b]
        k = result.members[b]
        out["expert"][i], out["radius_router"][i], out["predict"][i] = k, result.radius_router, result.prediction
        out["radius_expert"][i], out["p_expert_lower"][i], out["n_expert"][i] = cert.radius, cert.p_lower, cert.count
        out["sigma"][i], out["radius"][i] = experts[k].sigma, result.radius
    out["correct"] = (out["predict"] == scores.label).astype(np.int64)
    return out


def scaled(scores: RouterScores, experts: Sequence[ExpertStage], votes: tuple[np.ndarray, np.ndarray], scale: int):
    """A replay at ``scale`` times the stored N, for choosing only (not a certificate): every estimation count, the
    router's ``votes`` [m, K] and each expert's, is multiplied by ``scale`` (the same vote share, as
    ``benchmarks/rescale_labels.py`` re-scores labels). Returns (a scores stand-in whose estimation stage has
    ``scale`` * N samples and no logits, the scaled experts, the scaled votes) for :func:`simulate` and
    :func:`simulate_sets` with ``counts``."""
    scale = int(scale)
    if scale < 1:
        raise ValueError(f"scale must be a positive integer, got {scale}")
    select, estimate = (np.asarray(v, dtype=np.int64) for v in votes)
    m, n0, n = len(scores.idx), scores.select.shape[1], scores.estimate.shape[1] * scale
    k = select.shape[1]
    stand_in = dataclasses.replace(scores, select=np.broadcast_to(np.float32(0), (m, n0, k)),
                                   estimate=np.broadcast_to(np.float32(0), (m, n, k)))
    stages = [dataclasses.replace(e, n=e.n * scale, count=e.count * scale) for e in experts]
    return stand_in, stages, (select, estimate * scale)


def constant_routers(scores: RouterScores, experts: Sequence[ExpertStage], *, alpha: float, beta: float,
                     scale: int = 1) -> dict:
    """{expert name: :func:`simulate`'s result} for the router that sends every image to that expert
    (at ``scale`` times N: :func:`scaled`)."""
    k = len(experts)
    out = {}
    for j, e in enumerate(experts):
        offsets = np.where(np.arange(k) == j, 1e6, 0.0)
        stand_in, stages, counts = scaled(scores, experts, router_votes(scores, offsets), scale)
        out[e.name] = simulate(stand_in, stages, offsets, alpha=alpha, beta=beta, counts=counts)
    return out


def acr(result: dict) -> float:
    return float(np.mean(result["radius"] * result["correct"]))


def markdown_row(name: str, result: dict, radii: Sequence[float]) -> str:
    """``| name | certified accuracy (%) at each radius | ACR |`` for a simulated result."""
    accs = " | ".join(f"{100 * np.mean((result['correct'] == 1) & (result['radius'] >= r)):.1f}" for r in radii)
    return f"| {name} | {accs} | {acr(result):.4f} |"


def _grid(start: float, stop: float, step: float) -> np.ndarray:
    if not (step > 0 and stop >= start):
        raise ValueError(f"offset grid needs start <= stop and step > 0, got {start}:{stop}:{step}")
    return np.round(np.arange(start, stop + step / 2, step), 10)


def fit_offsets(scores: RouterScores, experts: Sequence[ExpertStage], *, alpha: float, beta: float,
                grid: tuple[float, float, float] = (-3.0, 3.0, 0.25), rows: np.ndarray | None = None,
                progress: Callable | None = None) -> tuple[np.ndarray, list[tuple[tuple[float, ...], float]]]:
    """Offsets (first class fixed at 0) that maximise the simulated dual ACR on the scored images.

    A full grid over the other K - 1 offsets, then a finer grid (step / 5) around the best
    point. Ties go to the offsets closest to 0 (max |b|), so a flat objective changes nothing.
    ``rows`` restricts the objective to some images (for split-half checks). Returns the best
    offsets and every evaluated (offsets, ACR).
    """
    k = scores.select.shape[-1]
    if k < 2:
        raise DataError("a router with one output has nothing to calibrate")
    sub = scores if rows is None else dataclasses.replace(
        scores, idx=scores.idx[rows], label=scores.label[rows], select=scores.select[rows],
        estimate=scores.estimate[rows])
    stages = experts if rows is None else [dataclasses.replace(e, guess=e.guess[rows], count=e.count[rows])
                                           for e in experts]
    seen: dict[tuple[float, ...], float] = {}

    def score(point) -> float:
        key = tuple(float(v) for v in point)
        if key not in seen:
            seen[key] = acr(simulate(sub, stages, (0.0, *key), alpha=alpha, beta=beta))
        return seen[key]

    def best_of(points):
        points = list(points)
        iterator = progress(points, len(points)) if progress else points
        for point in iterator:
            score(point)
        return max(points, key=lambda p: (seen[tuple(float(v) for v in p)], -max((abs(v) for v in p), default=0)))

    start, stop, step = grid
    axis = _grid(start, stop, step)
    if len(axis) ** (k - 1) > 20_000:
        raise DataError(f"the offset grid has {len(axis) ** (k - 1)} points for {k} experts; use a coarser --grid")
    coarse = best_of(itertools.product(axis, repeat=k - 1))
    fine_axes = [_grid(c - step, c + step, step / 5) for c in coarse]
    best = best_of(itertools.chain([coarse], itertools.product(*fine_axes)))
    ranked = sorted(seen.items(), key=lambda kv: -kv[1])
    return np.array((0.0, *best)), [((0.0, *p), a) for p, a in ranked]


# ---------------------------------------------------------------------------------------------
# 4. Writing a calibrated router, and results files from scores
# ---------------------------------------------------------------------------------------------

NETWORK_FILES = ("model.safetensors", "model.onnx", "model.int8.onnx")


def check_scores_router(scores: RouterScores, folder) -> None:
    """Refuse scores that were not computed with ``folder``'s network (weight hashes must agree)."""
    mine = folder.provenance()["sha256"]
    theirs = scores.meta.get("router", {})
    common = [f for f in NETWORK_FILES if f in mine and f in theirs]
    if not common or any(mine[f] != theirs[f] for f in common):
        raise DataError(f"the router scores were computed with another network than {folder.reference} "
                        f"(weight hashes differ); run `dualrs-route router-scores --router {folder.reference}`")
    if abs(float(folder.config.sigma) - scores.sigma) > 1e-12:
        raise DataError(f"the router scores used sigma_e = {scores.sigma} but {folder.reference} has "
                        f"sigma = {folder.config.sigma}")


def check_expert_order(experts: Sequence[ExpertStage], expert_folders) -> None:
    """Each results file must come from the router's expert at the same position (weight hashes)."""
    for k, (stage, folder) in enumerate(zip(experts, expert_folders)):
        models = stage.metadata.get("settings", {}).get("models", [])
        hashes = models[0].get("sha256", {}) if len(models) == 1 else {}
        mine = folder.provenance()["sha256"]
        common = [f for f in NETWORK_FILES if f in hashes and f in mine]
        if not common or any(hashes[f] != mine[f] for f in common):
            raise DataError(f"{stage.path} was not certified with the router's expert {k} ({folder.reference}); "
                            "give one --expert-results file per router expert, in the router's order")


def write_calibrated_router(folder, experts, out: str | os.PathLike, offsets, record: dict, *,
                            overwrite: bool = False) -> Path:
    """A copy of router ``folder`` (routing to the loaded ``experts``) with ``logit_offsets`` and a
    ``calibration`` record in its config.

    The network files are copied unchanged (the engines add the offsets). Local expert
    references are rewritten relative to ``out``. Written to a temporary folder and renamed.
    """
    from dualrs_route.experts.folders import CONFIG_FILE, save_folder

    from .training import portable_reference

    out = Path(out)
    if out.exists() and (any(out.iterdir()) and not overwrite):
        raise FileExistsError(f"{out} already exists; pass --force to replace it")
    config = dataclasses.replace(folder.config, logit_offsets=tuple(float(v) for v in offsets),
                                 experts=tuple(portable_reference(e, out) for e in experts), name=out.name,
                                 extra=dict(folder.config.extra, calibration=record))

    def fill(tmp: Path) -> None:
        tmp.mkdir(parents=True)
        for item in folder.path.iterdir():
            if item.is_file() and item.name != CONFIG_FILE and not item.name.endswith(".md"):
                shutil.copy2(item, tmp / item.name)
        save_folder(tmp, config)

    return _replace_folder(out, "calibrate", fill)


def _replace_folder(out: Path, tag: str, fill: Callable[[Path], None]) -> Path:
    """Write a model folder through a temporary sibling (``fill(tmp)``), then put it in place of ``out``."""
    tmp = out.with_name(out.name + f".tmp-{tag}")
    if tmp.exists():
        shutil.rmtree(tmp)
    fill(tmp)
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out


def write_grouped_router(folder, experts, out: str | os.PathLike, merges: dict[int, int], *,
                         overwrite: bool = False) -> Path:
    """A router over fewer experts from router ``folder`` (routing to the loaded ``experts``): for each
    ``merges`` entry j -> k, the votes for expert j count for expert k (architecture ``grouped_outputs``: each
    kept expert's logit is the largest of its group's). Its argmax is the source's, mapped (up to exact ties),
    so its certificate is the one :func:`merged_votes` replays from the source's scores. The weights are the
    source's, unchanged (keys ``base.*``). Refuses a source with logit offsets (they act before the grouping)."""
    from dualrs_route.experts.architectures import build_model
    from dualrs_route.experts.folders import save_folder

    from .training import init_from_folder, portable_reference

    cfg = folder.config
    if cfg.logit_offsets is not None:
        raise DataError(f"{folder.reference} has logit offsets; group the router they were fitted on")
    groups, kept = merge_groups(cfg.num_classes, merges)
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out} already exists; pass overwrite=True to replace it")
    args = {"base": cfg.architecture, "base_args": dict(cfg.architecture_args), "base_classes": int(cfg.num_classes),
            "groups": ",".join("+".join(str(v) for v in g) for g in groups)}
    model = build_model("grouped_outputs", num_classes=len(kept), input_shape=tuple(cfg.input_shape), mean=cfg.mean,
                        std=cfg.std, **args)
    fresh = init_from_folder(model, folder)  # the source's network becomes base.*, every tensor copied
    if fresh:
        raise DataError(f"{folder.reference}: tensors {fresh[:4]} have no counterpart in the grouped router")
    config = dataclasses.replace(cfg, architecture="grouped_outputs", architecture_args=args, num_classes=len(kept),
                                 class_names=None if cfg.class_names is None else tuple(cfg.class_names[k] for k in kept),
                                 experts=tuple(portable_reference(experts[k], out) for k in kept), name=out.name,
                                 extra=dict(cfg.extra, grouped={"source": folder.reference,
                                                                "merges": {str(j): int(k) for j, k in merges.items()}}))
    return _replace_folder(out, "group", lambda tmp: save_folder(tmp, config, model.eval()))


def write_gated_router(folder, gate, experts, out: str | os.PathLike, *, feature: str, threshold: float = 2.0,
                       gate_class: int | None = None, mode: str = "gate", weight: float = 0.0, bias: float = 0.0,
                       overwrite: bool = False) -> Path:
    """Router ``folder`` (routing to the loaded ``experts``) overruled by classifier folder ``gate`` (architecture
    ``gated_router``): on each noisy copy, where ``gate``'s confidence ``feature`` is >= ``threshold`` the vote
    goes to ``gate_class`` (default: the last expert), elsewhere to the router's argmax; with ``mode="blend"``
    the router's logit for ``gate_class`` is raised by ``weight`` * confidence + ``bias`` instead (float32).
    Both networks' weights are copied unchanged (keys
    ``router.*`` and ``gate.*``); both must normalise their input alike, as the folder normalises once. The
    router's experts, sigma_e and class names are kept. Refuses a router with logit offsets."""
    import torch

    from dualrs_route.experts.architectures import build_model
    from dualrs_route.experts.folders import save_folder

    from .training import portable_reference

    cfg, gcfg = folder.config, gate.config
    if cfg.logit_offsets is not None:
        raise DataError(f"{folder.reference} has logit offsets; gate the router they were fitted on")
    if tuple(cfg.input_shape) != tuple(gcfg.input_shape) or tuple(cfg.mean) != tuple(gcfg.mean) \
            or tuple(cfg.std) != tuple(gcfg.std):
        raise DataError(f"{gate.reference} takes other inputs (shape, mean or std) than {folder.reference}")
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out} already exists; pass overwrite=True to replace it")
    k = int(cfg.num_classes)
    args = {"router": cfg.architecture, "router_args": dict(cfg.architecture_args), "gate": gcfg.architecture,
            "gate_args": dict(gcfg.architecture_args), "gate_classes": int(gcfg.num_classes), "feature": str(feature),
            "threshold": float(threshold), "gate_class": k - 1 if gate_class is None else int(gate_class),
            "mode": str(mode), "weight": float(weight), "bias": float(bias)}
    model = build_model("gated_router", num_classes=k, input_shape=tuple(cfg.input_shape), mean=cfg.mean,
                        std=cfg.std, **args)
    state = {}
    for prefix, source in (("router", folder), ("gate", gate)):
        for name, value in source.load_torch_model().state_dict().items():
            head, _, rest = name.partition(".")  # "1.conv1.weight": the network behind the NormalizeLayer
            state[f"{head}.{prefix}.{rest}"] = value
    target = model.state_dict()
    if set(state) != set(target) or any(state[n].shape != target[n].shape for n in target):
        raise DataError(f"the weights of {folder.reference} and {gate.reference} do not fit a gated router")
    with torch.no_grad():
        model.load_state_dict(state)
    config = dataclasses.replace(cfg, architecture="gated_router", architecture_args=args, name=out.name,
                                 experts=tuple(portable_reference(e, out) for e in experts),
                                 extra=dict(cfg.extra, gated={"router": folder.reference, "gate": gate.reference}))
    return _replace_folder(out, "gate", lambda tmp: save_folder(tmp, config, model.eval()))


def merge_groups(num_experts: int, merges: dict[int, int]) -> tuple[list[list[int]], list[int]]:
    """(groups of router outputs, the expert each group routes to) when the votes for expert j count for
    expert ``merges[j]``: one group per kept expert, in expert order."""
    merges = {int(j): int(k) for j, k in merges.items()}
    bad = [(j, k) for j, k in merges.items() if not (0 <= j < num_experts and 0 <= k < num_experts) or j == k
           or k in merges]
    if bad or not merges:
        raise ValueError(f"merges {merges}: each j -> k needs two different experts of {num_experts}, k itself kept")
    kept = [j for j in range(num_experts) if j not in merges]
    groups = [[k] + sorted(j for j, t in merges.items() if t == k) for k in kept]
    return [sorted(g) for g in groups], kept


def merged_votes(votes: np.ndarray, merges: dict[int, int]) -> np.ndarray:
    """int64 [m, K']: vote counts [m, K] with the votes for expert j added to expert ``merges[j]``'s, the
    merged experts' columns removed (the router :func:`write_grouped_router` writes)."""
    votes = np.asarray(votes, dtype=np.int64)
    groups, _ = merge_groups(votes.shape[1], merges)
    return np.stack([votes[:, g].sum(axis=1) for g in groups], axis=1)


def write_composed_results(out: str | os.PathLike, scores: RouterScores, result: dict, *, router, experts, stages,
                           alpha: float, beta: float, command: str, overwrite: bool = False,
                           set_tau: float | None = None) -> Path:
    """Write ``result`` (from :func:`simulate`, or :func:`simulate_sets` with ``set_tau``) as a
    ``certify --router [--router-sets TAU]`` results TSV + sidecar.

    An existing file is replaced only with ``overwrite`` (it may hold hours of certification)."""
    from .results import COLUMNS, SET_COLUMNS, ResultsWriter, refuse_existing
    from .run import versions
    from .sets import format_members, set_guarantee

    out = Path(out)
    refuse_existing(out, overwrite)
    models = [router.provenance()] + [f.provenance() for f in experts]
    settings = {
        "command": "compose", "mode": "router", "dataset": scores.meta.get("dataset"),
        "data": scores.meta.get("data"), "split": scores.meta.get("split"), "skip": scores.meta.get("skip"),
        "max": scores.meta.get("max"), "N0": stages[0].metadata.get("settings", {}).get("N0"), "N": stages[0].n, "alpha_expert": alpha, "alpha_router": beta,
        "router_N0": int(scores.select.shape[1]), "router_N": int(scores.estimate.shape[1]),
        "seed": int(scores.meta["seed"]), "logit_offsets": list(router.config.logit_offsets or ()),
        **({"router_sets": float(set_tau)} if set_tau is not None else {}),
        "models": [{"reference": m["reference"], "sha256": m["sha256"], "revision": m["revision"]} for m in models]}
    metadata = {"started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "argv": command, "versions": versions(),
                "models": models, "certificate": True,
                "engines": [{"stage": "router", **scores.meta.get("engine", {})}]
                + [{"stage": f"expert {k}", **(s.metadata.get("engines") or [{}])[0], "results": s.path}
                   for k, s in enumerate(stages)],
                "guarantee": (f"each non-abstaining certified radius holds with probability >= {1 - alpha - beta:g} "
                              f"(router beta = {beta:g} + expert alpha = {alpha:g}, union bound)"
                              + (set_guarantee(set_tau) if set_tau is not None else "")),
                "notes": ["composed by `dualrs-route compose` from stored router scores and the experts' own "
                          "certificates with the same seed: the rows dual CERTIFY gives with these noise streams"]}
    writer = ResultsWriter(out, settings=settings, metadata=metadata, columns=COLUMNS if set_tau is None else SET_COLUMNS,
                           replace=True)
    names = [f.name for f in experts]
    for i in range(len(scores.idx)):
        k = int(result["expert"][i])
        routed = k != ABSTAIN
        writer.write({
            "idx": int(scores.idx[i]), "label": int(scores.label[i]), "predict": int(result["predict"][i]),
            "radius": float(result["radius"][i]), "correct": int(result["correct"][i]), "time": None,
            "expert": f"{k}:{names[k]}" if routed else "-1:-", "sigma": float(result["sigma"][i]) if routed else None,
            "radius_router": float(result["radius_router"][i]), "p_router_lower": float(result["p_router_lower"][i]),
            "n_router": int(result["n_router"][i]),
            "radius_expert": float(result["radius_expert"][i]) if routed else None,
            "p_expert_lower": float(result["p_expert_lower"][i]) if routed else None,
            "n_expert": int(result["n_expert"][i]) if routed else None,
            **({"members": format_members(result["members"][i]), "proof": result["proof"][i]}
               if set_tau is not None else {})})
    writer.close(finished=time.strftime("%Y-%m-%dT%H:%M:%S%z"), complete=True)
    return out
