"""Router labels: every expert's cheaply certified radius on every training image (Dual RS, routing form).

For each selected image x (with true label y) and each expert k (noise sigma_k) this runs
Cohen's CERTIFY with a small budget (default N0 = 10 selection and N = 100 estimation
samples, alpha = 0.001) and records

* ``predictions[i, k]``: the certified class, or -1 (ABSTAIN);
* ``radii[i, k]``: the certified L2 radius in pixel units, **0 when expert k abstains
  or certifies a class other than y** (the label rule of Sun, Mao and Vechev 2026);
* ``p_lower[i, k]``: the one-sided Clopper-Pearson lower bound on the top-class probability.

The best expert of an image is ``argmax_k radii[i, k]`` (ties: lowest k); images whose
radius is 0 for every expert carry no routing signal and are dropped by the trainer.

Labels are training targets, not certificates, so no union bound is spent across
experts: each expert is certified at ``alpha`` on its own. The default alpha = 0.001 is
the literature's standard certification level, so a label radius is exactly what a
(small-budget) certificate of that expert would report; with N = 100 the largest
possible label radius is sigma_k * Phi^-1(0.001 ** (1/100)) = 1.50 sigma_k.

Noise: image ``i`` (its index in the split) uses the streams
``NoiseKey(seed, i, Stage.LABEL_SELECT)`` and ``NoiseKey(seed, i, Stage.LABEL_ESTIMATE)``;
the selection and estimation draws are independent. All experts see the *same*
standard-normal draws (scaled by their own sigma), i.e. common random numbers, which
makes the comparison between experts less noisy. Results do not depend on ``batch``,
``chunk`` or on interruptions.

File format (``.npz``, loadable with ``numpy.load(path, allow_pickle=False)``):

============== ===================== =====================================================
key            dtype, shape          meaning
============== ===================== =====================================================
``indices``    int64 [n]             image index in the split, ascending
``labels``     int64 [n]             true class of each image
``radii``      float32 [n, K]        label radius per expert (0: abstain or wrong class)
``predictions``int64 [n, K]          class certified by each expert, -1 = abstain
``p_lower``    float64 [n, K]        Clopper-Pearson lower bound of each expert's top class
``experts``    str [K]               expert names
``references`` str [K]               expert references as given on the command line
``sha256``     str [K]               sha256 of each expert's weight file
``sigmas``     float64 [K]           each expert's noise level
``meta``       str (0-d)             JSON: format, settings, complete, done/total, times, dataset_size
============== ===================== =====================================================

``n`` grows while a run is in progress; ``meta["complete"]`` is true once every
selected image is done. The file is rewritten atomically (temporary file + rename)
after every chunk of images, so a killed run leaves a consistent file from which
re-running the same command continues.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np

from dualrs_route.experts.atomic import atomic_write
from dualrs_route.experts.data import Dataset, check_images
from dualrs_route.experts.errors import DataError, IncompatibleModelsError, ResumeMismatchError
from dualrs_route.experts.folders import ModelFolder
from dualrs_route.experts.noise import NoiseKey, Stage
from dualrs_route.experts.stats import ABSTAIN, certify_from_counts, check_alpha, check_count

from .results import diff_settings

FORMAT = "dualrs-route labels v1"
DEFAULT_N0 = 10
DEFAULT_N = 100
DEFAULT_ALPHA = 0.001
DEFAULT_CHUNK = 64


# --- the label rule (pure) ---


def label_radii_from_counts(selection: np.ndarray, estimation: np.ndarray, labels: np.ndarray, *, sigma: float,
                            alpha: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cohen's CERTIFY from counts, then the label rule, for B images of one expert.

    ``selection`` int [B, C] (the N0 draw) and ``estimation`` int [B, C] (the fresh N draw)
    are class counts; ``labels`` int [B] the true classes. Returns
    ``(predictions int64 [B], radii float32 [B], p_lower float64 [B])`` where a prediction
    is the certified class or -1, and the radius is the certified radius when the
    certified class equals the label, else 0 (abstain or wrong class).
    """
    selection = np.asarray(selection)
    estimation = np.asarray(estimation)
    labels = np.asarray(labels)
    if selection.shape != estimation.shape or selection.ndim != 2 or labels.shape != selection.shape[:1]:
        raise ValueError(f"need selection and estimation counts [B, C] and labels [B], got {selection.shape}, "
                         f"{estimation.shape}, {labels.shape}")
    n = int(estimation[0].sum()) if len(estimation) else 0
    predictions = np.empty(len(labels), dtype=np.int64)
    radii = np.zeros(len(labels), dtype=np.float32)
    p_lower = np.zeros(len(labels), dtype=np.float64)
    for j in range(len(labels)):
        guess = int(np.argmax(selection[j]))  # ties: lowest class, as np.argmax
        total = int(estimation[j].sum())
        if total != n:
            raise ValueError(f"every image needs the same number of estimation samples, got {total} and {n}")
        cert = certify_from_counts(guess, int(estimation[j, guess]), total, sigma, alpha)
        predictions[j] = cert.prediction
        p_lower[j] = cert.p_lower
        if cert.prediction != ABSTAIN and cert.prediction == int(labels[j]):
            radii[j] = cert.radius
    return predictions, radii, p_lower


def best_expert(radii: np.ndarray) -> np.ndarray:
    """int64 [n]: argmax_k radii[i, k], ties broken towards the lowest k."""
    return np.argmax(np.asarray(radii), axis=1).astype(np.int64)


def routable(radii: np.ndarray) -> np.ndarray:
    """bool [n]: images with a positive radius for at least one expert (the others are dropped)."""
    return np.any(np.asarray(radii) > 0, axis=1)


# --- the file ---


@dataclass
class LabelSet:
    """The contents of a labels file (see the module docstring for every array)."""

    indices: np.ndarray
    labels: np.ndarray
    radii: np.ndarray
    predictions: np.ndarray
    p_lower: np.ndarray
    experts: list[str]
    references: list[str]
    sha256: list[str]
    sigmas: np.ndarray
    meta: dict

    @property
    def complete(self) -> bool:
        return bool(self.meta.get("complete"))

    @property
    def num_experts(self) -> int:
        return len(self.experts)

    def arrays(self) -> dict[str, np.ndarray]:
        return {
            "indices": np.asarray(self.indices, dtype=np.int64), "labels": np.asarray(self.labels, dtype=np.int64),
            "radii": np.asarray(self.radii, dtype=np.float32).reshape(-1, self.num_experts),
            "predictions": np.asarray(self.predictions, dtype=np.int64).reshape(-1, self.num_experts),
            "p_lower": np.asarray(self.p_lower, dtype=np.float64).reshape(-1, self.num_experts),
            "experts": np.asarray(self.experts, dtype=str), "references": np.asarray(self.references, dtype=str),
            "sha256": np.asarray(self.sha256, dtype=str), "sigmas": np.asarray(self.sigmas, dtype=np.float64),
            "meta": np.asarray(json.dumps(self.meta, sort_keys=True, default=str)),
        }


def save_npz_atomic(path: str | os.PathLike, **arrays) -> None:
    """Write ``arrays`` as an npz at ``path`` atomically (temporary file, fsync, rename)."""
    with atomic_write(path) as handle:
        np.savez(handle, **arrays)


def save_labels(path: str | os.PathLike, labels: LabelSet) -> None:
    """Write ``labels`` to ``path`` atomically."""
    save_npz_atomic(path, **labels.arrays())


def load_labels(path: str | os.PathLike, *, require_complete: bool = False) -> LabelSet:
    """Read a labels file; DataError if it is not one (or, with ``require_complete``, unfinished)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"no labels file {path}; create it with `dualrs-route labels ... --out {path}`")
    try:
        with np.load(path, allow_pickle=False) as archive:
            missing = [k for k in ("indices", "labels", "radii", "predictions", "p_lower", "experts", "references",
                                   "sha256", "sigmas", "meta") if k not in archive]
            if missing:
                raise DataError(f"{path}: not a dualrs-route labels file (missing {missing})")
            data = {k: archive[k] for k in archive.files}
        meta = json.loads(str(data["meta"]))
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: cannot read labels file: {exc}") from None
    if meta.get("format") != FORMAT:
        raise DataError(f"{path}: format {meta.get('format')!r} is not {FORMAT!r}")
    k = len(data["experts"])
    result = LabelSet(
        indices=data["indices"].astype(np.int64), labels=data["labels"].astype(np.int64),
        radii=data["radii"].astype(np.float32).reshape(-1, k),
        predictions=data["predictions"].astype(np.int64).reshape(-1, k),
        p_lower=data["p_lower"].astype(np.float64).reshape(-1, k), experts=[str(e) for e in data["experts"]],
        references=[str(r) for r in data["references"]], sha256=[str(s) for s in data["sha256"]],
        sigmas=data["sigmas"].astype(np.float64), meta=meta,
    )
    if require_complete and not result.complete:
        raise DataError(f"{path} is incomplete ({meta.get('done')} of {meta.get('total')} images); re-run the "
                        f"labels command that wrote it to finish it (command: {meta.get('command', '?')})")
    return result


MERGE_KEYS = ("dataset", "split", "N0", "N", "alpha", "label_rule")


def merge_labels(sets: Sequence[LabelSet], sources: Sequence[str]) -> LabelSet:
    """One label set from several complete files of the same experts, data set and label budget.

    The files must hold disjoint images (e.g. ``--max 2000`` and ``--start 2000 --max 8000``);
    the rows are sorted by image index. A single file is returned unchanged.
    """
    if len(sets) != len(sources) or not sets:
        raise ValueError("merge_labels needs one source name per label set, and at least one set")
    if len(sets) == 1:
        return sets[0]
    first, first_settings = sets[0], sets[0].meta.get("settings", {})
    for other, source in zip(sets[1:], sources[1:]):
        if other.sha256 != first.sha256 or not np.array_equal(other.sigmas, first.sigmas):
            raise IncompatibleModelsError(f"{source} was made with other experts than {sources[0]} "
                                          f"({other.experts} vs {first.experts}, compared by weight hash and sigma)")
        settings = other.meta.get("settings", {})
        diffs = [f"{k}: {first_settings.get(k)!r} vs {settings.get(k)!r}" for k in MERGE_KEYS
                 if first_settings.get(k) != settings.get(k)]
        if diffs:
            raise DataError(f"{source} and {sources[0]} were labelled differently and cannot be merged: "
                            + "; ".join(diffs))
    indices = np.concatenate([s.indices for s in sets])
    unique, counts = np.unique(indices, return_counts=True)
    if len(unique) != len(indices):
        raise DataError(f"the labels files overlap (image {int(unique[counts > 1][0])} is in more than one); "
                        "merge files of disjoint images only")
    order = np.argsort(indices, kind="stable")

    def stack(name):
        return np.concatenate([getattr(s, name) for s in sets])[order]

    meta = json.loads(json.dumps(first.meta))
    meta["settings"]["selection"] = {"merged": [s.meta.get("settings", {}).get("selection") for s in sets]}
    meta["settings"]["images"] = int(len(indices))
    meta.update(done=int(len(indices)), total=int(len(indices)), complete=all(s.complete for s in sets),
                seconds=float(sum(s.meta.get("seconds", 0.0) for s in sets)),
                merged_from=[{"file": str(src), "images": int(len(s.indices)), "command": s.meta.get("command")}
                             for s, src in zip(sets, sources)])
    return LabelSet(indices=stack("indices"), labels=stack("labels"), radii=stack("radii"),
                    predictions=stack("predictions"), p_lower=stack("p_lower"), experts=list(first.experts),
                    references=list(first.references), sha256=list(first.sha256), sigmas=first.sigmas.copy(),
                    meta=meta)


def weights_hash(folder: ModelFolder) -> str:
    """The sha256 that identifies an expert's network (safetensors if present, else ONNX)."""
    return folder.files.get("model.safetensors") or next(iter(folder.files.values()))


def select_label_indices(length: int, *, max_images: int | None = None, fraction: float | None = None,
                         seed: int = 0, start: int = 0) -> np.ndarray:
    """Images to label (sorted int64): from the images ``start .. length-1``, all of them, the
    first ``max_images``, or a fixed random ``fraction`` of them.

    The fraction subset is ``start + experts.training.training_subset(length - start, fraction, seed)``.
    ``start`` lets a held-out labels file use images that the training labels do not.
    """
    from dualrs_route.experts.training import training_subset

    if max_images is not None and fraction is not None:
        raise ValueError("pass either --max or --fraction, not both")
    start = check_count(start, "--start", minimum=0)
    if start >= length:
        raise DataError(f"--start {start} is past the end of the split ({length} images)")
    if max_images is not None:
        check_count(max_images, "--max")
        return np.arange(start, min(length, start + int(max_images)), dtype=np.int64)
    if fraction is not None:
        if not (0.0 < float(fraction) <= 1.0):
            raise ValueError(f"--fraction must be in (0, 1], got {fraction}")
        return start + training_subset(length - start, float(fraction), seed).astype(np.int64)
    return np.arange(start, length, dtype=np.int64)


@dataclass
class LabelJob:
    """What a process needs to label chunks of images (picklable: Ray actors get a copy)."""

    folders: list[ModelFolder]
    n0: int
    n: int
    alpha: float
    seed: int
    batch: int = 400
    engine: str = "auto"
    device: str = "cpu"
    precision: str = "fp32"
    compile: bool = False

    def build(self, counters: Sequence | None = None) -> "LabelChunk":
        """The chunk function with the experts' counters (built from the folders unless given)."""
        if counters is None:
            from dualrs_route.export.engines import make_counter

            counters = [make_counter(f, engine=self.engine, device=self.device, batch_size=self.batch,
                                     precision=self.precision, compile=self.compile) for f in self.folders]
        return LabelChunk(self, list(counters))


class LabelChunk:
    """``(xs, ys, idx) -> (radii, predictions, p_lower)`` of one chunk, every expert (see compute_labels)."""

    def __init__(self, job: LabelJob, counters: list):
        self.job, self.counters = job, counters
        self.engines = [c.describe() if hasattr(c, "describe") else type(c).__name__ for c in counters]

    def __call__(self, xs: np.ndarray, ys: np.ndarray, idx: np.ndarray):
        job, k_experts = self.job, len(self.counters)
        select_keys = [NoiseKey(int(job.seed), int(i), Stage.LABEL_SELECT) for i in idx]
        estimate_keys = [NoiseKey(int(job.seed), int(i), Stage.LABEL_ESTIMATE) for i in idx]
        radii = np.zeros((len(idx), k_experts), np.float32)
        predictions = np.zeros((len(idx), k_experts), np.int64)
        p_lower = np.zeros((len(idx), k_experts), np.float64)
        for k, (counter, folder) in enumerate(zip(self.counters, job.folders)):
            sigma = folder.config.sigma
            sel = counter.counts_many(xs, sigma, job.n0, keys=select_keys)
            est = counter.counts_many(xs, sigma, job.n, keys=estimate_keys)
            predictions[:, k], radii[:, k], p_lower[:, k] = label_radii_from_counts(sel, est, ys, sigma=sigma,
                                                                                    alpha=job.alpha)
        return radii, predictions, p_lower


class LocalChunks:
    """Chunks computed in this process, in order (the default of compute_labels and collect_scores)."""

    def __init__(self, compute: Callable):
        self.compute = compute
        self.engines = compute.engines

    def map(self, chunks: Sequence, args_of: Callable) -> Iterator:
        return (self.compute(*args_of(c)) for c in chunks)

    def close(self) -> None:
        pass


def compute_labels(experts: Sequence[ModelFolder], dataset: Dataset, indices: Sequence[int], *, out: str | os.PathLike,
                   n0: int = DEFAULT_N0, n: int = DEFAULT_N, alpha: float = DEFAULT_ALPHA, seed: int = 0,
                   batch: int = 400, chunk: int = DEFAULT_CHUNK, engine: str = "auto", device: str = "cpu",
                   precision: str = "fp32", compile: bool = False, data: str | None = None,
                   selection: dict | None = None,
                   command: str = "", progress: Callable[[int], None] | None = None,
                   log: Callable[[str], None] | None = None, counters: Sequence | None = None,
                   workers: Callable[[LabelJob], object] | None = None) -> LabelSet:
    """Certify every image of ``indices`` with every expert and write the labels file ``out``.

    ``chunk`` images at a time go through each expert's ``counts_many`` (their noisy copies
    share forward batches of ``batch`` samples); after each chunk the file is rewritten
    atomically. If ``out`` exists with the same settings the run continues after its last
    finished image (a finished file is returned as is); other settings raise
    ResumeMismatchError. ``progress(k)`` is called with the number of images just finished.
    ``counters`` (one :class:`~experts.engine.NoisyCounter` per expert) replaces building
    them from the folders, for tests. ``workers(job)`` (e.g. ``distributed.RayChunks``) computes
    the chunks elsewhere, with a ``map(chunks, args_of)`` that yields them in order; this process
    still writes every chunk, so the file is the same.
    """
    from dualrs_route.router.dual import check_expert_set

    log = log or (lambda message: None)
    if len(experts) < 2:
        raise IncompatibleModelsError(f"router labels need at least two experts (--expert, repeated), "
                                      f"got {len(experts)}")
    check_expert_set(list(experts))
    n0, n = check_count(n0, "--N0"), check_count(n, "--N")
    alpha = check_alpha(alpha, "--alpha")
    check_count(batch, "--batch")
    chunk = check_count(chunk, "--chunk")
    if seed < 0:
        raise ValueError(f"--seed must be >= 0, got {seed}")
    indices = np.asarray(indices, dtype=np.int64)
    if len(indices) == 0:
        raise DataError("no images selected to label")
    if np.any(np.diff(indices) <= 0) or indices[0] < 0 or indices[-1] >= len(dataset):
        raise DataError(f"image indices must be ascending and within [0, {len(dataset)})")
    cfg = experts[0].config
    check_images(dataset, indices, cfg.input_shape)
    bad = indices[(dataset.labels[indices] < 0) | (dataset.labels[indices] >= cfg.num_classes)]
    if len(bad):
        raise DataError(f"image {bad[0]} has label {dataset.labels[bad[0]]}, outside the experts' "
                        f"{cfg.num_classes} classes")
    out = Path(out)
    if out.is_dir():
        raise DataError(f"--out {out} is a folder; give a .npz file name")
    settings = {
        "dataset": dataset.name, "split": dataset.split, "data": data, "selection": selection or {},
        "images": int(len(indices)),
        "indices_sha256": hashlib.sha256(indices.tobytes()).hexdigest(),
        "N0": n0, "N": n, "alpha": alpha, "seed": int(seed), "engine": engine, "precision": precision,
        "device_type": str(device).split(":")[0],
        "experts": [{"reference": f.reference, "sha256": weights_hash(f), "sigma": f.config.sigma} for f in experts],
        "noise": "common random numbers across experts: NoiseKey(seed, index, LABEL_SELECT / LABEL_ESTIMATE)",
        "label_rule": "radius of Cohen's CERTIFY if the certified class is the true label, else 0",
    }
    if compile:
        settings["compiled"] = True  # torch.compile: other kernels than eager torch
    k_experts = len(experts)
    now = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    if out.exists():
        current = load_labels(out)
        diffs = diff_settings(current.meta.get("settings", {}), json.loads(json.dumps(settings)))
        if diffs:
            raise ResumeMismatchError(f"{out} was written with other settings; use another --out, delete it, or repeat "
                                      "the original options. Differences: " + "; ".join(diffs))
        done = len(current.indices)
        if not np.array_equal(current.indices, indices[:done]):
            raise ResumeMismatchError(f"{out}: its finished images are not a prefix of the selection; delete it")
        current.meta.setdefault("resumed", []).append(now)
        if current.complete:
            log(f"{out} is already complete ({done} images)")
            return current
        log(f"resuming {out} at image {done} of {len(indices)}")
        state = current
    else:
        state = LabelSet(
            indices=np.zeros(0, np.int64), labels=np.zeros(0, np.int64), radii=np.zeros((0, k_experts), np.float32),
            predictions=np.zeros((0, k_experts), np.int64), p_lower=np.zeros((0, k_experts), np.float64),
            experts=[f.name for f in experts], references=[f.reference for f in experts],
            sha256=[weights_hash(f) for f in experts], sigmas=np.array([f.config.sigma for f in experts], np.float64),
            meta={"format": FORMAT, "settings": settings, "complete": False, "done": 0, "total": int(len(indices)),
                  "started": now, "command": command, "seconds": 0.0, "dataset_size": len(dataset),
                  "models": [f.provenance() for f in experts]},
        )
        done = 0
    job = LabelJob(list(experts), n0=n0, n=n, alpha=alpha, seed=int(seed), batch=batch, engine=engine, device=device,
                   precision=precision, compile=compile)
    source = workers(job) if workers is not None else LocalChunks(job.build(counters))
    try:
        if done == 0:
            save_labels(out, state)  # claim the file before the long part starts
        _label_chunks(out, state, source, dataset, indices, done, chunk, progress)
    finally:
        source.close()
    return state


def _label_chunks(out: Path, state: LabelSet, source, dataset: Dataset, indices: np.ndarray, done: int, chunk: int,
                  progress: Callable[[int], None] | None) -> None:
    """Label ``indices[done:]`` in chunks from ``source`` and rewrite the file after each, in order."""
    parts = {"indices": [state.indices], "labels": [state.labels], "radii": [state.radii],
             "predictions": [state.predictions], "p_lower": [state.p_lower]}
    groups = [indices[start:start + chunk] for start in range(done, len(indices), chunk)]
    started = time.perf_counter()
    for idx, (radii, predictions, p_lower) in zip(groups, source.map(groups, lambda idx: (
            dataset.batch(idx), dataset.labels[idx].astype(np.int64), idx))):
        ys = dataset.labels[idx].astype(np.int64)
        for key, value in (("indices", idx), ("labels", ys), ("radii", radii), ("predictions", predictions),
                           ("p_lower", p_lower)):
            parts[key].append(value)
        for key, value in parts.items():
            merged = np.concatenate(value)
            parts[key] = [merged]
            setattr(state, key, merged)
        now = time.perf_counter()
        state.meta.update(done=int(len(state.indices)), complete=bool(len(state.indices) == len(indices)),
                          updated=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                          seconds=round(float(state.meta.get("seconds", 0.0)) + now - started, 3))
        started = now
        save_labels(out, state)
        if progress:
            progress(len(idx))


def label_summary(labels: LabelSet) -> dict:
    """Per-expert and overall statistics of a labels file (for logs and the training record)."""
    radii = labels.radii
    keep = routable(radii)
    best = best_expert(radii[keep]) if keep.any() else np.zeros(0, np.int64)
    k = labels.num_experts
    return {
        "images": int(len(radii)), "routable": int(keep.sum()), "dropped_all_zero": int((~keep).sum()),
        "best_expert_share": {labels.experts[j]: round(float(np.mean(best == j)), 4) if len(best) else 0.0
                              for j in range(k)},
        "mean_radius": {labels.experts[j]: round(float(radii[:, j].mean()), 4) if len(radii) else 0.0
                        for j in range(k)},
        "oracle_mean_radius": round(float(radii.max(axis=1).mean()), 4) if len(radii) else 0.0,
    }
