"""Certification runs over a dataset: plan, validate everything, then stream rows to disk.

This is the library API behind ``dualrs-route certify`` and ``predict``. Nothing is
written before every model, option and selected image has been validated.
"""

from __future__ import annotations

import platform
import sys
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import numpy as np

from dualrs_route.experts.data import Dataset, check_images, select_indices
from dualrs_route.experts.errors import DualRSError, IncompatibleModelsError
from dualrs_route.experts.folders import ModelFolder, load_folder
from dualrs_route.experts.sequential import (
    DEFAULT_FINAL_SHARE,
    DEFAULT_FIRST_LOOK,
    DEFAULT_LOOK_RATIO,
    DEFAULT_PROJECTION_LEVEL,
    DEFAULT_RADIUS_TOL,
    StopPolicy,
    check_final_share,
    check_look_ratio,
    union_bound_schedule,
)
from dualrs_route.experts.smoothing import SmoothedClassifier
from dualrs_route.experts.engine import check_batch_memory
from dualrs_route.experts.stats import (ABSTAIN, certify_from_counts, check_alpha, check_budget, check_count,
                                        check_sigma)

from .cascade import DEFAULT_P0, CascadeCertifier, cascade_guarantee, cascade_row_fields, check_p0
from .dual import DualCertifier, build_smoothed, check_expert_set, load_router_set, split_alpha
from .results import COLUMNS, SEQUENTIAL_COLUMNS, SET_COLUMNS, SINGLE_COLUMNS, ResultsWriter, format_counts
from .sets import check_tau, format_members, set_guarantee
from .shards import Shard

PREDICT_COLUMNS = ("idx", "label", "predict", "correct", "time", "expert")
CASCADE_COLUMNS = COLUMNS + ("stage", "radius_skipped", "samples", "stages")
"""Cascade rows: Cohen's and the routing columns, then the cascade's own. In cascade rows, ``expert``
and ``sigma`` name the stage where the cascade stopped, ``radius_expert``/``p_expert_lower``/``n_expert``
are that stage's, ``stage`` is its position (0 = largest sigma), ``radius_skipped`` the min cap of the
skipped stages (radius = min(radius_skipped, radius_expert)), ``samples`` the noisy samples drawn, and
``stages`` every stage that ran (:meth:`CascadeCertificate.stages_text`). The router columns stay ``-``."""


@dataclass(frozen=True)
class SequentialOptions:
    """Budget policy of ``certify --sequential``: N (and the router's N) become caps, drawn in rounds
    on the schedule from ``first_look`` growing by ``look_ratio``, with ``final_share`` of each stage's
    alpha at its cap (experts/sequential.py), stopped by ``policy``."""

    first_look: int = DEFAULT_FIRST_LOOK
    policy: StopPolicy = StopPolicy()
    look_ratio: float = DEFAULT_LOOK_RATIO
    final_share: float | None = DEFAULT_FINAL_SHARE

    def schedule(self, cap: int, alpha: float):
        """The union-bound schedule of a stage with this cap and alpha."""
        return union_bound_schedule(cap, alpha, self.first_look, self.look_ratio, self.final_share)

    def settings(self) -> dict:
        return {"first_look": self.first_look, "look_ratio": self.look_ratio, "final_share": self.final_share,
                "target_radius": self.policy.target_radius,
                "radius_tol": self.policy.radius_tol, "radius_grid": self.policy.radius_grid,
                "max_radius": self.policy.enough_radius, "projection_level": self.policy.projection_level,
                "alpha_split": "final_share * alpha at the cap, the rest evenly over the other looks, per stage "
                               "(union bound)"}


def sequential_options(sequential: bool, target_radius: float | None, radius_tol: float | None,
                       first_look: int | None, radius_grid: float | None = None,
                       max_radius: float | None = None, look_ratio: float | None = None,
                       final_share: float | None = None, projection_level: float | None = None) -> SequentialOptions | None:
    """Validate the sequential options; ``target_radius`` implies sequential and excludes ``radius_tol``
    and ``radius_grid`` (its stop rule ignores them). ``final_share`` 0 splits alpha evenly over the
    looks, ``projection_level`` 0 turns the grid rule's projection off; None takes the defaults. None
    for a fixed-N run."""
    if not (sequential or target_radius is not None):
        if any(v is not None for v in (radius_tol, first_look, radius_grid, max_radius, look_ratio, final_share,
                                       projection_level)):
            raise IncompatibleModelsError("--radius-tol, --radius-grid, --max-radius, --first-look, --look-ratio, "
                                          "--final-share and --projection-level apply only with --sequential or "
                                          "--target-radius")
        return None
    if projection_level is not None and radius_grid is None:
        raise IncompatibleModelsError("--projection-level applies only with --radius-grid")
    if radius_tol is not None and radius_grid is not None:
        raise IncompatibleModelsError("pass --radius-tol or --radius-grid, not both")
    if target_radius is not None and (radius_tol is not None or radius_grid is not None):
        raise IncompatibleModelsError("--radius-tol and --radius-grid do not apply with --target-radius, which "
                                      "decides 'certified at R?' instead of improving the radius; drop them or use "
                                      "--sequential")
    first = check_count(DEFAULT_FIRST_LOOK if first_look is None else first_look, "--first-look")
    level = DEFAULT_PROJECTION_LEVEL if projection_level is None else (float(projection_level) or None)
    try:
        ratio = check_look_ratio(DEFAULT_LOOK_RATIO if look_ratio is None else look_ratio)
        share = check_final_share(DEFAULT_FINAL_SHARE if final_share is None else (float(final_share) or None))
        policy = StopPolicy(target_radius, DEFAULT_RADIUS_TOL if radius_tol is None else float(radius_tol),
                            enough_radius=max_radius, radius_grid=radius_grid, projection_level=level)
    except ValueError as exc:
        raise IncompatibleModelsError(f"--target-radius/--radius-tol/--radius-grid/--max-radius/--look-ratio/"
                                      f"--final-share/--projection-level: {exc}") from None
    return SequentialOptions(first, policy, ratio, share)


@dataclass
class RunPlan:
    """Everything a run needs, validated. Build it with :func:`plan_run`."""

    mode: str
    experts: list[ModelFolder]
    router: ModelFolder | None
    n0: int
    n: int
    alpha: float
    beta: float
    router_n0: int
    router_n: int
    seed: int
    engine: str
    precision: str
    device: str
    batch: int
    sigma_override: float | None = None
    notes: list[str] = field(default_factory=list)
    threads: int | None = None
    compile: bool = False
    p0: float | None = None  # cascade threshold (mode "cascade" only)
    sequential: SequentialOptions | None = None  # budget policy: None = fixed N (Cohen's CERTIFY)
    share_noise: bool = False  # router mode: experts with sigma = sigma_e read the router's noisy inputs
    set_tau: float | None = None  # router mode: set-valued router certificates (router/sets.py)

    def settings(self, dataset: Dataset, data: str | None, indices_desc: dict, command: str,
                 engines: Sequence[dict]) -> dict:
        """What must match for a resumed run (batch size and threads deliberately excluded).

        Each model is identified by the hash of the network file that runs on its engine
        (``engines[i]``, router first) and the canonical hash of its config's computational fields."""
        folders = ([self.router] if self.router else []) + self.experts
        models = [{"reference": f.reference, "revision": f.revision,
                   **f.fingerprint(e["engine"], e.get("precision", "fp32"))} for f, e in zip(folders, engines)]
        extra = {"cascade_p0": self.p0, "cascade_alpha_split": "even"} if self.mode == "cascade" else {}
        if self.sequential is not None:  # recorded only when on, so fixed-N results of earlier versions resume
            extra["sequential"] = self.sequential.settings()
        if self.share_noise:  # likewise
            extra["share_noise"] = True
        if self.set_tau is not None:  # likewise
            extra["router_sets"] = self.set_tau
        return {
            **extra,
            "command": command, "mode": self.mode, "dataset": dataset.name, "data": data, "split": dataset.split,
            **indices_desc, "N0": self.n0, "N": self.n, "alpha_expert": self.alpha,
            "alpha_router": self.beta if self.mode == "router" else None,
            "router_N0": self.router_n0 if self.mode == "router" else None,
            "router_N": self.router_n if self.mode == "router" else None,
            "seed": self.seed, "engine": self.engine, "precision": self.precision,
            "device_type": self.device.split(":")[0], "sigma_override": self.sigma_override,
            "models": models,
        }


def plan_run(*, experts: Sequence[str] = (), router: str | None = None, select: str | None = None, n0: int = 100,
             n: int = 100_000, alpha: float = 0.001, alpha_router: float | None = None, router_n0: int | None = None,
             router_n: int | None = None, seed: int = 0, engine: str = "auto", precision: str = "fp32",
             device: str = "cpu", batch: int = 400, sigma: float | None = None,
             cascade_p0: float | None = None, sequential: bool = False, target_radius: float | None = None,
             radius_tol: float | None = None, first_look: int | None = None,
             radius_grid: float | None = None, max_radius: float | None = None, look_ratio: float | None = None,
             final_share: float | None = None, projection_level: float | None = None,
             share_noise: bool = False, router_sets: float | None = None) -> RunPlan:
    """Validate options and load every model folder (no network weights yet, no output).

    Budgets are capped up front: N, N0 and the router's at :data:`~dualrs_route.experts.stats.MAX_SAMPLES`
    (10^9), ``batch`` so that one float32 noise buffer stays within
    :data:`~dualrs_route.experts.engine.MAX_BATCH_BYTES` (4 GiB).

    ``select`` is None, "router", "best-radius" (an oracle) or "cascade" (Multiscale, with
    threshold ``cascade_p0``, default 0.5). ``share_noise`` (router only): experts whose sigma equals
    the router's sigma_e read the router stage's noisy inputs (router/dual.py). ``router_sets`` (router,
    fixed N only): set-valued router certificates with selection-share threshold TAU (router/sets.py). ``sequential`` (implied by ``target_radius``) makes ``n``
    and ``router_n`` caps of sequential CERTIFY (single expert) or min-aware dual CERTIFY (router).
    """
    seq = sequential_options(sequential, target_radius, radius_tol, first_look, radius_grid, max_radius, look_ratio,
                             final_share, projection_level)
    if seq is not None and select in ("best-radius", "cascade"):
        raise IncompatibleModelsError(f"--sequential/--target-radius support a single --expert or --router, "
                                      f"not --select {select}")
    n0 = check_budget(n0, "--N0")
    n = check_budget(n, "--N")
    check_alpha(alpha, "--alpha")
    check_count(batch, "--batch")
    if seed < 0:
        raise ValueError(f"--seed must be >= 0, got {seed}")
    if sigma is not None:
        sigma = check_sigma(sigma, "--sigma")
    if router and experts:
        raise IncompatibleModelsError("pass either --router (which lists its experts) or --expert, not both")
    if share_noise and not router:
        raise IncompatibleModelsError("--share-noise applies only with --router (the expert stage reads the router "
                                      "stage's noisy inputs)")
    if router_sets is not None:
        if not router:
            raise IncompatibleModelsError("--router-sets applies only with --router")
        if seq is not None or share_noise:
            raise IncompatibleModelsError("--router-sets certifies fixed-N rows without --share-noise; drop "
                                          "--sequential/--target-radius/--share-noise")
        router_sets = check_tau(router_sets)
    if cascade_p0 is not None and select != "cascade":
        raise IncompatibleModelsError("--cascade-p0 applies only with --select cascade")
    if router:
        if select not in (None, "router"):
            raise IncompatibleModelsError(f"--select {select} takes --expert options, not --router")
        if sigma is not None:
            raise IncompatibleModelsError("--sigma overrides a single expert's noise; it cannot be used with --router")
        router_folder, expert_folders = _load_router_quietly(router)
        notes = check_expert_set(expert_folders, router_folder)
        check_batch_memory(batch, router_folder.config.input_shape)
        a, b = split_alpha(alpha, alpha_router)
        rn0 = check_budget(router_n0 if router_n0 is not None else n0, "--router-N0")
        rn = check_budget(router_n if router_n is not None else n, "--router-N")
        if share_noise and not any(f.config.sigma == router_folder.config.sigma for f in expert_folders):
            notes.append(f"--share-noise changes nothing here: no expert has the router's sigma_e = "
                         f"{router_folder.config.sigma}")
        return RunPlan("router", expert_folders, router_folder, n0, n, a, b, rn0, rn, seed, engine, precision, device,
                       batch, None, notes, sequential=seq, share_noise=bool(share_noise), set_tau=router_sets)
    if not experts:
        raise IncompatibleModelsError("nothing to certify: pass --router REF or --expert REF")
    if alpha_router is not None or router_n0 is not None or router_n is not None:
        raise IncompatibleModelsError("--alpha-router, --router-N0 and --router-N apply only with --router")
    folders = [load_folder(ref, expected_kind="expert") for ref in experts]
    check_expert_set(folders)
    check_batch_memory(batch, folders[0].config.input_shape)
    if len(folders) > 1 and select not in ("best-radius", "cascade"):
        raise IncompatibleModelsError("several --expert options need --select best-radius (an oracle for analysis) "
                                      "or --select cascade (Multiscale), or use --router to route between them")
    if select in ("best-radius", "cascade") and len(folders) < 2:
        raise IncompatibleModelsError(f"--select {select} needs at least two --expert options")
    if sigma is not None and len(folders) > 1:
        raise IncompatibleModelsError("--sigma overrides one expert's noise; pass a single --expert")
    mode = select if select in ("best-radius", "cascade") else "single"
    p0 = check_p0(DEFAULT_P0 if cascade_p0 is None else cascade_p0) if mode == "cascade" else None
    return RunPlan(mode, folders, None, n0, n, alpha, 0.0, 0, 0, seed, engine, precision, device, batch, sigma, [],
                   p0=p0, sequential=seq)


def _load_router_quietly(reference: str):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return load_router_set(reference)


def versions() -> dict:
    """Versions of Python, the platform, this package and the libraries that shape results."""
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version(), "platform": platform.platform(), "machine": platform.machine(),
           "processor": platform.processor()}
    try:
        out["dualrs-route"] = version("dualrs-route")
    except PackageNotFoundError:  # running from a checkout that is not installed
        out["dualrs-route"] = "checkout"
    for module in ("numpy", "scipy", "torch", "onnxruntime", "huggingface_hub", "safetensors"):
        mod = sys.modules.get(module)
        if mod is None:
            try:
                mod = __import__(module)
            except ImportError:
                continue
        out[module] = getattr(mod, "__version__", "?")
    return out


class Runner:
    """Holds the built smoothed classifiers of a plan and certifies examples one at a time."""

    def __init__(self, plan: RunPlan):
        self.plan = plan
        options = dict(engine=plan.engine, device=plan.device, batch_size=plan.batch, precision=plan.precision,
                       threads=plan.threads, compile=plan.compile)
        self.experts: list[SmoothedClassifier] = [build_smoothed(f, **options) for f in plan.experts]
        if plan.sigma_override is not None:
            self.experts[0].sigma = plan.sigma_override
        self.dual = None
        if plan.router is not None:
            self.dual = DualCertifier(build_smoothed(plan.router, router=True, **options), self.experts,
                                      share_noise=plan.share_noise, set_tau=plan.set_tau)
        self.cascade = CascadeCertifier(self.experts) if plan.mode == "cascade" else None
        counters = ([self.dual.router.counter] if self.dual else []) + [e.counter for e in self.experts]
        self.engines = [c.describe() for c in counters]

    def expert_label(self, k: int) -> str:
        return "-1:-" if k == ABSTAIN else f"{k}:{self.plan.experts[k].name}"

    def certify_row(self, x: np.ndarray, label: int, index: int) -> dict:
        plan = self.plan
        start = time.perf_counter()
        row = {"idx": index, "label": label, "radius_router": None, "p_router_lower": None, "n_router": None}
        if plan.sequential is not None:
            row.update(self._sequential_row(x, index))
        elif plan.mode == "router":
            result = self.dual.certify(x, n0=plan.n0, n=plan.n, alpha=plan.alpha, router_n0=plan.router_n0,
                                       router_n=plan.router_n, beta=plan.beta, seed=plan.seed, index=index)
            rc, ec = result.router_certificate, result.expert_certificate
            row.update(predict=result.prediction, radius=result.radius, expert=self.expert_label(result.expert),
                       radius_router=rc.radius, p_router_lower=rc.p_lower, n_router=rc.count,
                       sigma=self.experts[result.expert].sigma if ec else None,
                       radius_expert=ec.radius if ec else None, p_expert_lower=ec.p_lower if ec else None,
                       n_expert=ec.count if ec else None)
            if plan.set_tau is not None:
                row.update(members=format_members(result.members), proof=result.proof)
        elif plan.mode == "cascade":
            result = self.cascade.certify(x, n0=plan.n0, n=plan.n, alpha=plan.alpha, p0=plan.p0, seed=plan.seed,
                                          index=index)
            row.update(cascade_row_fields(result, self.expert_label))
        elif plan.mode == "single":
            expert = self.experts[0]
            guess, counts = expert.draw_counts(x, n0=plan.n0, n=plan.n, seed=plan.seed, index=index)
            c = certify_from_counts(guess, int(counts[guess]), plan.n, expert.sigma, plan.alpha)
            row.update(predict=c.prediction, radius=c.radius, expert=self.expert_label(0), sigma=expert.sigma,
                       radius_expert=c.radius, p_expert_lower=c.p_lower, n_expert=c.count, guess=guess,
                       counts=format_counts(counts))
        else:
            certs = [e.certify(x, n0=plan.n0, n=plan.n, alpha=plan.alpha, seed=plan.seed, index=index)
                     for e in self.experts]
            best = 0
            if plan.mode == "best-radius":  # oracle: uses the label
                scores = [c.radius if c.prediction == label else -1.0 for c in certs]
                best = int(np.argmax(scores))
            c = certs[best]
            row.update(predict=c.prediction, radius=c.radius, expert=self.expert_label(best),
                       sigma=self.experts[best].sigma, radius_expert=c.radius, p_expert_lower=c.p_lower,
                       n_expert=c.count)
        row["correct"] = int(row["predict"] == label)
        row["time"] = time.perf_counter() - start
        return row

    def _sequential_row(self, x: np.ndarray, index: int) -> dict:
        """The row fields of sequential CERTIFY (single expert) or min-aware dual CERTIFY (router).

        ``n_used`` counts every noisy sample the row drew (selection and estimation, both stages);
        ``n_router_used``/``n_expert_used`` the estimation samples of each stage; ``stop`` the stop rules
        (``router/expert`` with a router)."""
        plan, seq = self.plan, self.plan.sequential
        schedule = seq.schedule(plan.n, plan.alpha)
        if plan.mode != "router":
            c = self.experts[0].certify_sequential(x, n0=plan.n0, schedule=schedule, policy=seq.policy,
                                                   seed=plan.seed, index=index)
            return dict(predict=c.prediction, radius=c.radius, expert=self.expert_label(0),
                        sigma=self.experts[0].sigma, radius_expert=c.radius, p_expert_lower=c.p_lower,
                        n_expert=c.count, n_used=plan.n0 + c.n, n_expert_used=c.n, stop=c.stop)
        result = self.dual.certify_sequential(
            x, n0=plan.n0, schedule=schedule, router_n0=plan.router_n0,
            router_schedule=seq.schedule(plan.router_n, plan.beta), policy=seq.policy,
            seed=plan.seed, index=index)
        rc, ec = result.router_certificate, result.expert_certificate
        return dict(predict=result.prediction, radius=result.radius, expert=self.expert_label(result.expert),
                    radius_router=rc.radius, p_router_lower=rc.p_lower, n_router=rc.count,
                    sigma=self.experts[result.expert].sigma if ec else None,
                    radius_expert=ec.radius if ec else None, p_expert_lower=ec.p_lower if ec else None,
                    n_expert=ec.count if ec else None, n_router_used=rc.n, n_expert_used=ec.n if ec else None,
                    n_used=plan.router_n0 + rc.n + (plan.n0 + ec.n if ec else 0),
                    stop=f"{rc.stop}/{ec.stop if ec else '-'}")

    def predict_row(self, x: np.ndarray, label: int, index: int) -> dict:
        plan = self.plan
        start = time.perf_counter()
        if plan.mode == "router":
            prediction, expert = self.dual.predict(x, n=plan.n, alpha=plan.alpha, router_n=plan.router_n,
                                                   beta=plan.beta, seed=plan.seed, index=index)
        elif plan.mode == "single":
            prediction, _ = self.experts[0].predict(x, n=plan.n, alpha=plan.alpha, seed=plan.seed, index=index)
            expert = 0
        else:
            raise IncompatibleModelsError("predict supports --router or a single --expert")
        return {"idx": index, "label": label, "predict": prediction, "correct": int(prediction == label),
                "time": time.perf_counter() - start, "expert": self.expert_label(expert)}


class LocalRows:
    """Certifies (or predicts) examples in this process, one after another, with one :class:`Runner`.

    The row source protocol that :func:`execute` drives: ``engines`` (what each counter runs on,
    router first), ``rows(task, dataset, indices)`` yielding one row per index **in the order of
    ``indices``**, and ``close()``. :class:`~dualrs_route.router.distributed.RayRows` is the other."""

    def __init__(self, plan: RunPlan):
        self.runner = Runner(plan)  # loads weights: corrupt or mismatched files fail here, before any output
        self.engines = self.runner.engines

    def rows(self, task: str, dataset: Dataset, indices: Sequence[int]) -> Iterator[dict]:
        row_fn = self.runner.certify_row if task == "certify" else self.runner.predict_row
        for i in indices:
            yield row_fn(dataset.image(i), int(dataset.labels[i]), i)

    def close(self) -> None:
        pass


def engine_settings(engines: Sequence[dict]) -> list[dict]:
    """The fields of engine descriptions that change results: engine, precision, noise source, and
    torch.compile (other kernels than eager torch, like a precision change; recorded only when on,
    so results of earlier versions still resume). Timing options (prefetch, I/O binding) do not."""
    return [{**{k: e.get(k) for k in ("engine", "precision", "noise")},
             **({"compiled": True} if e.get("compiled") else {})} for e in engines]


def execute(plan: RunPlan, dataset: Dataset, *, skip: int, max_index: int, out_path, data: str | None,
            command: str, task: str = "certify", progress: Callable | None = None, shard: Shard | None = None,
            rows: Callable[[RunPlan], "LocalRows"] = LocalRows) -> ResultsWriter:
    """Validate the data against the plan, build the engines, then certify (or predict) every selected example.

    The selection is every ``skip``-th example below ``max_index``, then, with ``shard``, that
    shard's round-robin share (:mod:`.shards`). Rows go to ``out_path`` one flushed line at a
    time, in index order; an existing file with the same settings is resumed.
    ``progress(iterable, length)`` may wrap the loop in a progress bar. ``rows(plan)`` builds the
    row source (default :class:`LocalRows`, this process; :class:`~.distributed.RayRows` spreads
    examples over Ray actors and yields their rows in the same order).
    """
    indices = select_indices(len(dataset), skip, max_index)
    selected = shard.select(indices) if shard else indices
    check_images(dataset, selected, plan.experts[0].config.input_shape)
    bad_labels = [i for i in selected if not (0 <= dataset.labels[i] < plan.experts[0].config.num_classes)]
    if bad_labels:
        raise DualRSError(f"example {bad_labels[0]} has label {dataset.labels[bad_labels[0]]}, outside the experts' "
                          f"{plan.experts[0].config.num_classes} classes")
    source = rows(plan)
    try:
        selection = {"skip": skip, "max": max_index, **({"shard": str(shard)} if shard else {})}
        settings = plan.settings(dataset, data, selection, task, source.engines)
        settings["engines"] = engine_settings(source.engines)
        metadata = {"started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "argv": command, "versions": versions(),
                    "models": [f.provenance() for f in ([plan.router] if plan.router else []) + plan.experts],
                    "engines": source.engines, "certificate": plan.mode != "best-radius",
                    "guarantee": _guarantee(plan, task), "notes": plan.notes,
                    "selection": {"dataset_size": len(dataset), "selected": len(selected),
                                  "shard": str(shard) if shard else None}}
        if task != "certify":
            columns = PREDICT_COLUMNS
        else:
            columns = (CASCADE_COLUMNS if plan.mode == "cascade" else SEQUENTIAL_COLUMNS if plan.sequential else
                       SINGLE_COLUMNS if plan.mode == "single" else SET_COLUMNS if plan.set_tau is not None else COLUMNS)
        writer = ResultsWriter(out_path, settings=settings, metadata=metadata, columns=columns)
        todo = [i for i in selected if i not in writer.done]
        started = time.perf_counter()
        produced = source.rows(task, dataset, todo)
        failed = True
        try:
            for row in (progress(produced, len(todo)) if progress else produced):
                writer.write(row)
            failed = False
        finally:
            writer.close(after_error=failed, finished=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                         complete=set(selected) <= writer.done,
                         last_session_seconds=round(time.perf_counter() - started, 3))
    finally:
        source.close()
    return writer


def _guarantee(plan: RunPlan, task: str) -> str:
    text = _fixed_guarantee(plan, task)
    if plan.sequential is None or task != "certify":
        return text
    seq = plan.sequential
    split = ("alpha / (number of looks) at each look" if seq.final_share is None else
             f"{seq.final_share:g} of the stage's alpha at the cap and the rest evenly over the earlier looks")
    return (f"{text}; sequential: each stage's N is a cap, its looks grow {seq.look_ratio:g}x from {seq.first_look}, "
            f"{split}: a union bound valid at any stopping time")


def _fixed_guarantee(plan: RunPlan, task: str) -> str:
    if plan.mode == "best-radius":
        return "NOT a certificate: the expert is chosen per example with the true label (oracle, for analysis only)"
    if plan.mode == "router":
        total = plan.alpha + plan.beta
        what = "certified radius" if task == "certify" else "prediction"
        return (f"each non-abstaining {what} holds with probability >= {1 - total:g} "
                f"(router beta = {plan.beta:g} + expert alpha = {plan.alpha:g}, union bound)"
                + (set_guarantee(plan.set_tau) if plan.set_tau is not None and task == "certify" else ""))
    if plan.mode == "cascade":
        return cascade_guarantee(plan.alpha, len(plan.experts), plan.p0)
    return f"each non-abstaining result holds with probability >= {1 - plan.alpha:g} (Cohen et al. 2019)"
