"""The Python API: load a model, certify or predict one input, or run a whole dataset.

``alpha`` is always the **total** failure probability, as on the command line: a routed
model splits it between the router (beta) and the expert (evenly unless ``alpha_router``
is given). Abstaining is a value: ``prediction == ABSTAIN`` (-1) and ``radius == 0.0``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from dualrs_route.experts.data import load_dataset
from dualrs_route.experts.folders import ModelFolder, load_folder
from dualrs_route.experts.smoothing import DEFAULT_ALPHA, DEFAULT_N, DEFAULT_N0, SmoothedClassifier
from dualrs_route.experts.stats import ABSTAIN, check_alpha
from dualrs_route.router.dual import DualCertifier, build_smoothed, load_router_set, split_alpha
from dualrs_route.router.results import ResultTable, read_results, summarize
from dualrs_route.router.run import execute, plan_run

__all__ = ["ABSTAIN", "Model", "Certification", "Prediction", "load", "certify", "predict", "run_dataset"]


@dataclass
class Model:
    """A loaded smoothed classifier: one expert, or a router together with the experts it lists.

    ``experts[k]`` is expert k's :class:`SmoothedClassifier`; ``router`` is set for a router.
    """

    reference: str
    folder: ModelFolder
    experts: list[SmoothedClassifier]
    expert_folders: list[ModelFolder]
    router: SmoothedClassifier | None = None

    @property
    def kind(self) -> str:
        return "router" if self.router is not None else "expert"

    @property
    def num_classes(self) -> int:
        return self.experts[0].num_classes

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.folder.config.input_shape)

    @property
    def class_names(self) -> tuple[str, ...] | None:
        return self.expert_folders[0].config.class_names

    def __repr__(self) -> str:
        sigmas = ", ".join(f"{e.sigma:g}" for e in self.experts)
        head = f"router sigma_e={self.router.sigma:g} over experts" if self.router else "expert"
        return f"Model({self.reference!r}: {head} sigma {sigmas}; {self.num_classes} classes)"


@dataclass(frozen=True)
class Certification:
    """One input's certificate. With probability at least ``confidence`` (= 1 - total alpha)
    over the noise, if ``prediction != ABSTAIN`` the smoothed classifier (routed, for a router)
    predicts ``prediction`` everywhere in the L2 ball of ``radius`` around the input (pixel units).

    For a router, ``radius = min(radius_router, radius_expert)`` and ``expert`` is the routed
    expert's index (ABSTAIN when the router abstained)."""

    prediction: int
    radius: float
    confidence: float
    expert: int
    radius_router: float | None
    radius_expert: float | None
    p_lower_router: float | None
    p_lower_expert: float | None

    @property
    def abstained(self) -> bool:
        return self.prediction == ABSTAIN


@dataclass(frozen=True)
class Prediction:
    """PREDICT's answer: with probability at least ``confidence``, a non-abstaining
    ``prediction`` is the smoothed classifier's class at the input."""

    prediction: int
    confidence: float
    expert: int

    @property
    def abstained(self) -> bool:
        return self.prediction == ABSTAIN


def load(reference: str, *, engine: str = "auto", device: str = "cpu", batch_size: int = 400,
         precision: str = "fp32", threads: int | None = None) -> Model:
    """Load an expert or a router folder (a path, ``hf://org/repo[@rev]`` or ``builtin:NAME``).

    A router loads every expert it lists. ``engine`` is ``auto``, ``torch``, ``onnxruntime``
    or ``tensorrt``; ``batch_size`` is the number of noisy samples per forward pass (it does not
    change results). Loading never executes code from the folder (safetensors or ONNX).
    """
    folder = load_folder(reference)
    options = dict(engine=engine, device=device, batch_size=batch_size, precision=precision, threads=threads)
    if folder.config.kind == "router":
        router_folder, expert_folders = load_router_set(reference)
        experts = [build_smoothed(f, **options) for f in expert_folders]
        return Model(reference, router_folder, experts, expert_folders,
                     router=build_smoothed(router_folder, router=True, **options))
    return Model(reference, folder, [build_smoothed(folder, **options)], [folder])


def _image(model: Model, x) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    if tuple(x.shape) != model.input_shape:
        raise ValueError(f"x must have shape {list(model.input_shape)} (one [C, H, W] image in [0, 1]), "
                         f"got {list(x.shape)}")
    if not np.isfinite(x).all() or x.min() < 0 or x.max() > 1:
        raise ValueError("x must hold finite pixel values in [0, 1] (noise and radii are in [0, 1] units)")
    return x


def certify(model: Model, x, *, n0: int = DEFAULT_N0, n: int = DEFAULT_N, alpha: float = DEFAULT_ALPHA,
            alpha_router: float | None = None, router_n0: int | None = None, router_n: int | None = None,
            seed: int = 0, index: int = 0) -> Certification:
    """Cohen's CERTIFY for one image ``x`` (float32 [C, H, W] in [0, 1]); Dual RS for a router.

    ``alpha`` is the total failure probability; for a router the router stage gets
    ``alpha_router`` (default: half) and the expert the rest. ``router_n0``/``router_n``
    default to ``n0``/``n``. The noise of each stage derives from ``(seed, index, stage)``,
    so the same arguments give the same certificate, and they match row ``index`` of a
    ``dualrs-route certify --seed SEED`` run.
    """
    x = _image(model, x)
    total = check_alpha(alpha, "alpha")
    if model.router is None:
        c = model.experts[0].certify(x, n0=n0, n=n, alpha=total, seed=seed, index=index)
        return Certification(c.prediction, c.radius, 1 - total, 0, None, c.radius, None, c.p_lower)
    alpha_expert, beta = split_alpha(total, alpha_router)
    result = DualCertifier(model.router, model.experts).certify(
        x, n0=n0, n=n, alpha=alpha_expert, router_n0=router_n0 or n0, router_n=router_n or n, beta=beta,
        seed=seed, index=index)
    rc, ec = result.router_certificate, result.expert_certificate
    return Certification(result.prediction, result.radius, 1 - total, result.expert, rc.radius,
                         ec.radius if ec else None, rc.p_lower, ec.p_lower if ec else None)


def predict(model: Model, x, *, n: int = DEFAULT_N, alpha: float = DEFAULT_ALPHA, alpha_router: float | None = None,
            router_n: int | None = None, seed: int = 0, index: int = 0) -> Prediction:
    """Cohen's PREDICT (two-sided binomial test of the top two counts) for one image; routed
    for a router, with the total ``alpha`` split as in :func:`certify`."""
    x = _image(model, x)
    total = check_alpha(alpha, "alpha")
    if model.router is None:
        prediction, _ = model.experts[0].predict(x, n=n, alpha=total, seed=seed, index=index)
        return Prediction(prediction, 1 - total, 0)
    alpha_expert, beta = split_alpha(total, alpha_router)
    prediction, expert = DualCertifier(model.router, model.experts).predict(
        x, n=n, alpha=alpha_expert, router_n=router_n or n, beta=beta, seed=seed, index=index)
    return Prediction(prediction, 1 - total, expert)


def run_dataset(*, out: str | Path, experts: Sequence[str] = (), router: str | None = None,
                select: str | None = None, dataset: str = "digits", data: str | None = None, split: str = "test",
                skip: int = 1, max_index: int = -1, n0: int = DEFAULT_N0, n: int = DEFAULT_N,
                alpha: float = DEFAULT_ALPHA, alpha_router: float | None = None, router_n0: int | None = None,
                router_n: int | None = None, seed: int = 0, engine: str = "auto", precision: str = "fp32",
                device: str = "cpu", batch: int = 400, cascade_p0: float | None = None, sequential: bool = False,
                target_radius: float | None = None, radius_tol: float | None = None, first_look: int | None = None,
                radius_grid: float | None = None, max_radius: float | None = None, look_ratio: float | None = None,
                final_share: float | None = None, projection_level: float | None = None,
                share_noise: bool = False, router_sets: float | None = None,
                command: str = "dualrs_route.run_dataset",
                progress: Callable | None = None) -> tuple[ResultTable, dict]:
    """Certify every ``skip``-th example of a dataset below ``max_index`` (Cohen's protocol) into ``out``.

    Exactly what ``dualrs-route certify`` does: one flushed TSV row per example (Cohen's six
    columns first) plus a ``.json`` sidecar; re-running with the same ``out`` resumes. Give a
    ``router``, one expert, or several experts with ``select`` (``cascade``: the Multiscale
    cascade, threshold ``cascade_p0``, default 0.5; ``best-radius``: the oracle, not a
    certificate). ``sequential`` (implied by ``target_radius``) makes ``n``/``router_n`` caps of
    sequential (with a router: min-aware) CERTIFY, as ``certify --sequential``; ``router_sets`` as
    ``certify --router-sets`` (set-valued router certificates, router/sets.py). Returns the results
    table and its summary (certified accuracy at the usual radii, ACR, abstain rate).
    """
    plan = plan_run(experts=experts, router=router, select=select, n0=n0, n=n, alpha=alpha,
                    alpha_router=alpha_router, router_n0=router_n0, router_n=router_n, seed=seed, engine=engine,
                    precision=precision, device=device, batch=batch, cascade_p0=cascade_p0, sequential=sequential,
                    target_radius=target_radius, radius_tol=radius_tol, first_look=first_look,
                    radius_grid=radius_grid, max_radius=max_radius, look_ratio=look_ratio, final_share=final_share,
                    projection_level=projection_level, share_noise=share_noise, router_sets=router_sets)
    ds = load_dataset(dataset, split=split, data=data)
    execute(plan, ds, skip=skip, max_index=max_index, out_path=Path(out), data=data, command=command,
            progress=progress)
    table = read_results(Path(out))
    return table, summarize(table)
