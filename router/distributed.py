"""Certification runs spread over Ray actors, with the same file as one process.

:class:`RayRows` is a row source for :func:`.run.execute` (like :class:`.run.LocalRows`):

* one actor per worker (``workers``), each with ``threads`` CPUs and ``gpus`` GPUs; an actor
  builds its :class:`.run.Runner` once (models loaded, engine warm) and certifies one example
  per call;
* the driver (the process that runs ``certify``) sends each example's image and label, keeps
  two calls in flight per actor, and yields the rows **in the order of the indices it was
  given**, buffering rows that finish early. The driver alone writes the results file, so
  resume, the progress bar and the sidecar work exactly as in one process;
* results cannot depend on which actor certified an example: noise is keyed by (seed, example
  index, stage), and every actor checks that its model files hash as the driver's did.

Failures (our own resubmission on top of Ray's actor restarts): actors are created with
``max_restarts=MAX_RESTARTS`` and ``max_task_retries=0``. When a call fails because its actor
died (process killed, node lost), the driver puts the example back at the front of the queue,
where the next free actor takes it, and pings the dead actor; once Ray has restarted it (it
reloads its models) it gets work again. An example that was in flight on a dead actor is sent
again **alone** (its actor gets no other call meanwhile), so a later death is its own; after
MAX_REQUEUES re-queues, a third death stops the run with one line naming its idx (an example that
crashes its worker would otherwise use up every restart). An actor past its restarts drops out;
when every actor has, the run stops with one line. Either way the rows before the failure are
written, and re-running the command resumes after them.
An error raised by the certification itself (bad input, non-finite output) is not retried: it
ends the run with that error.
"""

from __future__ import annotations

import dataclasses
import heapq
import os
from typing import Iterator, Sequence

from dualrs_route.experts.data import Dataset
from dualrs_route.experts.errors import DualRSError
from dualrs_route.experts.folders import sha256_file

from .run import RunPlan, Runner, engine_settings

INSTALL_HINT = "Ray is not installed; install it with: pip install 'dualrs-route[distributed]'"
MAX_RESTARTS = 3
MAX_REQUEUES = 2  # re-queues of one example whose actor died; the next death stops the run
IN_FLIGHT = 2  # calls queued per actor, so that it never waits for the driver


def import_ray():
    """The ``ray`` module, or a DualRSError with the install hint."""
    try:
        import ray
    except ImportError:
        raise DualRSError(INSTALL_HINT) from None
    return ray


class CertifyWorker:
    """The actor body: one Runner per process, built on first use (again after a restart)."""

    def __init__(self, plan: RunPlan, threads: int):
        self.plan = plan
        self.threads = threads
        self.runner: Runner | None = None

    def start(self) -> dict:
        """Build the runner (if not yet built); return its engines, process id and Ray node id."""
        import ray

        if self.runner is None:
            import torch

            torch.set_num_threads(self.threads)
            check_model_files(self.plan)
            self.runner = Runner(self.plan)
        return {"engines": self.runner.engines, "pid": os.getpid(), "node": ray.get_runtime_context().get_node_id()}

    def row(self, task: str, x, label: int, index: int) -> dict:
        self.start()
        fn = self.runner.certify_row if task == "certify" else self.runner.predict_row
        return fn(x, label, index)


def check_model_files(plan: RunPlan) -> None:
    """DualRSError unless every model file on this node hashes as it did when the driver loaded it."""
    check_folder_files(([plan.router] if plan.router else []) + plan.experts)


def worker_plan(plan: RunPlan, threads: int) -> RunPlan:
    """The plan an actor runs: ``threads`` intra-op threads, and on a GPU the device Ray assigned it
    (Ray sets CUDA_VISIBLE_DEVICES per actor, so its GPU is ``cuda``)."""
    return dataclasses.replace(plan, threads=threads, device=worker_device(plan.device))


def worker_device(device: str) -> str:
    """The device an actor uses for ``device``: on a GPU the one Ray assigned it (Ray sets
    CUDA_VISIBLE_DEVICES per actor, so it is ``cuda``)."""
    return "cuda" if device.startswith("cuda") else device


def connect(address: str | None, num_cpus: int):
    """Start a local Ray cluster (``address`` None, empty or "local") with ``num_cpus`` CPUs, or join
    the cluster at ``address`` ("auto", "HOST:PORT", "ray://HOST:PORT"). Returns the ray module and
    whether this call connected (and so must disconnect); a session already started is reused."""
    ray = import_ray()
    if ray.is_initialized():
        return ray, False
    options = dict(include_dashboard=False, log_to_driver=False, configure_logging=False)
    local = address in (None, "", "local")
    try:
        ray.init(**(dict(address="local", num_cpus=num_cpus) if local else dict(address=address)), **options)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        where = "start a local Ray cluster" if local else f"connect to the Ray cluster at {address}"
        raise DualRSError(f"cannot {where}: {' '.join(str(exc).split())[:300]}") from None
    return ray, True


def start_actors(owner, worker, args: tuple, *, workers: int, threads: int, gpus: float) -> list[dict]:
    """Create ``workers`` restartable actors of class ``worker`` as ``owner.actors``, start them all at
    once (they load their models in parallel) and return their start reports, after setting
    ``owner.engines`` and ``owner.pids`` and checking that every actor runs the same engines. On any
    failure ``owner`` is closed first; an actor that dies while starting is one :class:`DualRSError` line."""
    worker_class = owner.ray.remote(worker).options(num_cpus=threads, num_gpus=gpus, max_restarts=MAX_RESTARTS,
                                                    max_task_retries=0)
    try:
        check_resources(owner.ray, workers, threads, gpus)
        owner.actors = [worker_class.remote(*args) for _ in range(workers)]
        started = [owner._get(r) for r in [a.start.remote() for a in owner.actors]]
    except owner.ray.exceptions.RayActorError as exc:
        owner.close()
        raise DualRSError(f"a Ray worker died while starting: {' '.join(str(exc).split())[:300]}") from None
    except BaseException:
        owner.close()
        raise
    owner.engines = started[0]["engines"]
    owner.pids = [s["pid"] for s in started]
    for s in started[1:]:
        owner._check_engines(s)
    return started


class RayRows:
    """Row source over ``workers`` Ray actors (see the module docstring). Build it with the plan;
    ``engines`` are the first actor's, and every actor must report the same result-relevant fields."""

    def __init__(self, plan: RunPlan, *, address: str | None = None, workers: int = 2, threads: int = 1,
                 gpus: float | None = None):
        if workers < 1 or threads < 1:
            raise ValueError(f"--workers and --threads must be >= 1, got {workers} and {threads}")
        if gpus is None:
            gpus = 1.0 if plan.device.startswith("cuda") else 0.0
        self.ray, self._owns_session = connect(address, workers * threads)
        self.retried = 0  # examples given back to the queue after their actor died
        self.restarts = 0  # actors back at work after Ray restarted them
        started = start_actors(self, CertifyWorker, (worker_plan(plan, threads), threads), workers=workers,
                               threads=threads, gpus=gpus)
        self.nodes = [s["node"] for s in started]

    def _get(self, ref):
        """ray.get, with a certification error re-raised as itself (one clean line in the CLI)."""
        try:
            return self.ray.get(ref)
        except self.ray.exceptions.RayTaskError as exc:
            raise (exc.cause if isinstance(exc.cause, Exception) else DualRSError(str(exc))) from None

    def _check_engines(self, started: dict) -> None:
        if engine_settings(started["engines"]) != engine_settings(self.engines):
            raise DualRSError(f"Ray workers run different engines ({engine_settings(started['engines'])} vs "
                              f"{engine_settings(self.engines)}); install the same packages on every node")

    def rows(self, task: str, dataset: Dataset, indices: Sequence[int]) -> Iterator[dict]:
        """One row per index, in the order of ``indices``, whatever order the actors finish in."""
        indices = list(indices)
        state = _Dispatch(len(self.actors), len(indices))
        emitted = 0
        while emitted < len(indices):
            self._submit(state, task, dataset, indices)
            if not state.calls and not state.pings:
                raise DualRSError(f"every Ray worker died ({len(self.actors)} actors, {MAX_RESTARTS} restarts each); "
                                  f"{emitted} rows were written: re-run the same command to resume")
            ready, _ = self.ray.wait(list(state.calls) + list(state.pings), num_returns=1)
            for ref in ready:
                self._collect(state, ref, indices)
            while emitted in state.finished:
                yield state.finished.pop(emitted)
                emitted += 1

    def _submit(self, state: "_Dispatch", task: str, dataset: Dataset, indices: list[int]) -> None:
        """Fill every working actor up to IN_FLIGHT calls, lowest positions first; an example whose
        actor died before (a suspect) goes alone to an idle actor."""
        for k in list(state.live):
            while state.live[k] < IN_FLIGHT and state.queue and k not in state.alone:
                pos = state.queue[0]
                if pos in state.deaths:
                    if state.live[k]:
                        break
                    state.alone.add(k)
                heapq.heappop(state.queue)
                i = indices[pos]
                state.calls[self.actors[k].row.remote(task, dataset.image(i), int(dataset.labels[i]), i)] = (k, pos)
                state.live[k] += 1

    def _collect(self, state: "_Dispatch", ref, indices: list[int]) -> None:
        """A finished call: keep its row, or, if its actor died, re-queue the example (DualRSError
        after MAX_REQUEUES) and ping the actor."""
        if ref in state.pings:
            self._revive(state.pings.pop(ref), ref, state)
            return
        k, pos = state.calls.pop(ref)
        try:
            state.finished[pos] = self._get(ref)
        except self.ray.exceptions.RayActorError:
            state.deaths[pos] = state.deaths.get(pos, 0) + 1
            if state.deaths[pos] > MAX_REQUEUES:
                raise DualRSError(f"example {indices[pos]} ended its Ray worker {state.deaths[pos]} times (the "
                                  f"last {MAX_REQUEUES} alone on it); stopping. Rows already written are kept: fix "
                                  "the cause (out of memory? a crash in the model?) and re-run the same command "
                                  "to resume") from None
            heapq.heappush(state.queue, pos)
            self.retried += 1
            if k in state.live:  # first failure seen from this actor: no more work until Ray restarts it
                del state.live[k]
                state.pings[self._ping(k)] = k
            return
        state.alone.discard(k)
        if k in state.live:
            state.live[k] -= 1

    def _ping(self, k: int):
        """A start() call that Ray retries while actor ``k`` restarts; it fails only once the actor is
        gone for good (past its restarts)."""
        return self.actors[k].start.options(max_task_retries=-1).remote()

    def _revive(self, k: int, ref, state: "_Dispatch") -> None:
        """A ping to a dead actor came back: it restarted (back to work) or is gone for good (dropped)."""
        try:
            started = self._get(ref)
        except self.ray.exceptions.RayActorError:
            return
        self._check_engines(started)
        self.pids[k], self.nodes[k] = started["pid"], started["node"]
        self.restarts += 1
        state.live[k] = 0  # a restarted actor has no calls in flight: the old ones failed
        state.alone.discard(k)

    def close(self) -> None:
        for actor in getattr(self, "actors", []):
            self.ray.kill(actor, no_restart=True)
        self.actors = []
        if self._owns_session:
            self.ray.shutdown()
            self._owns_session = False


@dataclasses.dataclass
class _Dispatch:
    """The driver's book-keeping during :meth:`RayRows.rows`: positions (into the indices) still to
    send, as a heap; calls in flight per working actor; pending calls and pings; finished rows by position;
    how often each position's actor died; the actors running a suspect alone."""

    actors: int
    size: int
    queue: list = dataclasses.field(init=False)
    live: dict = dataclasses.field(init=False)
    calls: dict = dataclasses.field(default_factory=dict)  # ref -> (actor slot, position)
    pings: dict = dataclasses.field(default_factory=dict)  # ref -> actor slot
    finished: dict = dataclasses.field(default_factory=dict)  # position -> row
    deaths: dict = dataclasses.field(default_factory=dict)  # position -> times its actor died under it
    alone: set = dataclasses.field(default_factory=set)  # actor slots running a suspect, nothing else

    def __post_init__(self):
        self.queue = list(range(self.size))  # sorted, hence already a heap
        self.live = {k: 0 for k in range(self.actors)}


def check_resources(ray, workers: int, threads: int, gpus: float) -> None:
    """DualRSError if the whole cluster has fewer CPUs or GPUs than the workers ask for (they would wait
    forever). Whether each worker fits on one node is left to Ray."""
    have = ray.cluster_resources()
    for name, need in (("CPU", workers * threads), ("GPU", workers * gpus)):
        if need > have.get(name, 0):
            raise DualRSError(f"{workers} Ray workers x ({threads} CPU, {gpus:g} GPU) need {need:g} {name} but the "
                              f"Ray cluster has {have.get(name, 0):g}; use fewer --workers, --threads or "
                              "--gpus-per-worker, or a larger cluster")


# --- ordered chunks of work (labels, router-scores) over actors --------------------------------


MAX_CHUNK_REQUEUES = 2  # re-sends of one chunk whose actor died; the next death stops the run


class ChunkWorker:
    """The actor body of :class:`RayChunks`: ``job.build()`` (its models loaded once, after the
    sha256 check of ``job.folders``) gives the function that computes one chunk."""

    def __init__(self, job, threads: int):
        self.job = job
        self.threads = threads
        self.compute = None

    def start(self) -> dict:
        """Build the job (if not yet built); return its engines, process id and Ray node id."""
        import ray

        if self.compute is None:
            import torch

            torch.set_num_threads(self.threads)
            check_folder_files(self.job.folders)
            self.compute = self.job.build()
        return {"engines": self.compute.engines, "pid": os.getpid(), "node": ray.get_runtime_context().get_node_id()}

    def run(self, *args):
        self.start()
        return self.compute(*args)


class RayChunks:
    """Chunks of work over ``workers`` Ray actors (:class:`ChunkWorker`), results in chunk order.

    ``job`` is a picklable dataclass with ``folders`` (the model folders every actor hash-checks),
    ``device`` (``gpus`` defaults to 1 on cuda, else 0; cuda:N becomes the actor's cuda) and
    ``build()`` (called once per actor process; returns a callable with an ``engines`` attribute
    that maps one chunk's arguments to its result). Every actor must report the same engines.

    :meth:`map` sends one chunk per actor at a time, so an actor's death is always its chunk's:
    the chunk goes back to the front of the queue (at most MAX_CHUNK_REQUEUES times, then a
    DualRSError naming it), the actor is pinged and takes work again once Ray has restarted it (it
    rebuilds the job); an actor past MAX_RESTARTS drops out, and with none left the run stops with
    one line. Results do not depend on which actor computed a chunk: the jobs key their noise by
    (seed, image index, stage).
    Chunks finished ahead of the next one to yield are buffered, at most ``2 * workers`` of them.
    An error raised by the job itself is re-raised as itself and not retried.
    """

    def __init__(self, job, *, address: str | None = None, workers: int = 2, threads: int = 1,
                 gpus: float | None = None):
        if workers < 1 or threads < 1:
            raise ValueError(f"--workers and --threads must be >= 1, got {workers} and {threads}")
        if gpus is None:
            gpus = 1.0 if job.device.startswith("cuda") else 0.0
        job = dataclasses.replace(job, device=worker_device(job.device))
        self.ray, self._owns_session = connect(address, workers * threads)
        self.retried = 0  # chunks given back to the queue after their actor died
        self.restarts = 0  # actors back at work after Ray restarted them
        self._pings = {}  # ref -> actor slot: dead actors that get no work until Ray has restarted them
        start_actors(self, ChunkWorker, (job, threads), workers=workers, threads=threads, gpus=gpus)

    _get = RayRows._get

    def _check_engines(self, started: dict) -> None:
        if started["engines"] != self.engines:
            raise DualRSError(f"Ray workers run different engines ({started['engines']} vs {self.engines}); "
                              "install the same packages on every node")

    def map(self, chunks: Sequence, args_of) -> Iterator:
        """``job(*args_of(chunk))`` for every chunk, yielded in the order of ``chunks``; ``args_of`` is
        called on the driver when the chunk is sent (again if it is re-sent)."""
        chunks = list(chunks)
        queue = list(range(len(chunks)))  # positions still to send (a heap)
        pings = self._pings  # kept from an earlier map: an actor may still be restarting
        idle = set(range(len(self.actors))) - set(pings.values())  # working actors without a call
        calls, finished, deaths = {}, {}, {}
        emitted, window = 0, 2 * len(self.actors)
        while emitted < len(chunks):
            while idle and queue and queue[0] < emitted + window:
                k, pos = idle.pop(), heapq.heappop(queue)
                calls[self.actors[k].run.remote(*args_of(chunks[pos]))] = (k, pos)
            if emitted in finished:  # yield only after every idle actor has work
                yield finished.pop(emitted)
                emitted += 1
                continue
            if not calls and not pings:
                raise DualRSError(f"every Ray worker died ({len(self.actors)} actors, {MAX_RESTARTS} restarts each); "
                                  f"{emitted} chunks were written: re-run the same command to resume")
            [ref], _ = self.ray.wait(list(calls) + list(pings), num_returns=1)
            if ref in pings:
                k = pings.pop(ref)
                try:
                    started = self._get(ref)
                except self.ray.exceptions.RayActorError:
                    continue  # past its restarts: dropped
                self._check_engines(started)
                self.pids[k] = started["pid"]
                self.restarts += 1
                idle.add(k)
                continue
            k, pos = calls.pop(ref)
            try:
                finished[pos] = self._get(ref)
            except self.ray.exceptions.RayActorError:
                deaths[pos] = deaths.get(pos, 0) + 1
                if deaths[pos] > MAX_CHUNK_REQUEUES:
                    raise DualRSError(f"chunk {pos + 1} of {len(chunks)} ended its Ray worker {deaths[pos]} times; "
                                      "stopping. Chunks already written are kept: fix the cause (out of memory? a "
                                      "crash in the model?) and re-run the same command to resume") from None
                heapq.heappush(queue, pos)
                self.retried += 1
                pings[self.actors[k].start.options(max_task_retries=-1).remote()] = k
                continue
            idle.add(k)

    close = RayRows.close


def check_folder_files(folders) -> None:
    """DualRSError unless every file of ``folders`` on this node hashes as it did when the driver loaded it."""
    for folder in folders:
        for name, digest in folder.files.items():
            path = folder.path / name
            found = sha256_file(path) if path.is_file() else None
            if found != digest:
                raise DualRSError(f"Ray worker on {os.uname().nodename}: {path} is {'missing' if found is None else 'different'}"
                                  f" (the driver's sha256 is {digest[:12]}...); every node needs the same model "
                                  "files at the same path")
