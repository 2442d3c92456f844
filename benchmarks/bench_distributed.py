"""Scale-out: Ray workers against one process, Ray's start-up cost, and a two-node cluster on loopback.

On the CIFAR-10 expert (``builtin:cifar10-resnet20-sigma0.25``, single-expert CERTIFY of the
first ``--examples`` test images), with the same certification code that ``certify`` runs:

1. **one process x T threads** (:class:`router.run.LocalRows`, torch intra-op threads = T);
2. **W Ray workers x 1 thread** on a local Ray cluster started here (:class:`router.distributed.RayRows`);
3. **Ray start-up cost**: seconds for ``ray.init`` of a local cluster, and for W actors to load
   the model and answer (the fixed cost a run pays before its first row);
4. **two nodes on this machine**: ``ray start --head --num-cpus 1`` plus a second
   ``ray start --address 127.0.0.1:PORT --num-cpus 1``, W = 2 workers (one per node) joined
   through the address, as a real cluster would be.

Throughput is noisy samples per second, examples x (N0 + N) / seconds of the certification loop
(start-up excluded), median over ``--repeats`` after one warm-up example. Every configuration
must give the same rows as the one process (all columns but ``time``); the script stops with an
error otherwise. The two nodes are ``ray start --block`` child processes of this script, stopped
by their process ids at the end (never ``ray stop``, which would stop every Ray node of the user).

Usage (from the repository root, on quiet cores):
    python benchmarks/bench_distributed.py --data ../shared/data --json benchmarks/results/distributed.json
Tiny check that it runs (not a measurement):
    python benchmarks/bench_distributed.py --examples 2 --n 50 --repeats 1
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from dualrs_route.experts.data import load_dataset
from dualrs_route.router.distributed import RayRows, import_ray
from dualrs_route.router.run import LocalRows, plan_run, versions

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data"


def timed_rows(source, dataset, indices, repeats: int) -> tuple[list[dict], list[float]]:
    """Rows of ``indices`` and the seconds of each of ``repeats`` passes, after one warm-up example."""
    list(source.rows("certify", dataset, indices[:1]))
    seconds, rows = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        rows = list(source.rows("certify", dataset, indices))
        seconds.append(time.perf_counter() - start)
    return rows, seconds


def same_rows(a: list[dict], b: list[dict]) -> bool:
    strip = [{k: v for k, v in row.items() if k != "time"} for row in a], \
            [{k: v for k, v in row.items() if k != "time"} for row in b]
    return strip[0] == strip[1]


def summary(name: str, seconds: list[float], samples: int, **extra) -> dict:
    median = statistics.median(seconds)
    return {"config": name, "seconds": [round(s, 3) for s in seconds], "median_seconds": round(median, 3),
            "samples_per_second": round(samples / median, 1), **extra}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ray_node(*args: str, tmp: Path, name: str) -> subprocess.Popen:
    """``ray start --block ARGS`` as a child process (its log in ``tmp``/``name``.log)."""
    log = open(tmp / f"{name}.log", "w")
    return subprocess.Popen([str(Path(sys.executable).with_name("ray")), "start", "--block", "--disable-usage-stats",
                             *args], stdout=log, stderr=subprocess.STDOUT)


def wait_for_cpus(ray, cpus: int, timeout: float = 120.0) -> None:
    deadline = time.time() + timeout
    while ray.cluster_resources().get("CPU", 0) < cpus:
        if time.time() > deadline:
            raise SystemExit(f"the two-node cluster did not reach {cpus} CPUs in {timeout:.0f} s")
        time.sleep(0.5)


def two_nodes(plan, dataset, indices, repeats, reference, tmp: Path) -> dict:
    """A head and a worker node on loopback (1 CPU each), two Ray workers joined through the address."""
    ray = import_ray()
    port = free_port()
    nodes = [ray_node("--head", "--include-dashboard=false", "--node-ip-address=127.0.0.1", f"--port={port}", "--num-cpus=1", tmp=tmp, name="head")]
    try:
        time.sleep(5)
        nodes.append(ray_node(f"--address=127.0.0.1:{port}", "--node-ip-address=127.0.0.1", "--num-cpus=1", tmp=tmp,
                              name="worker"))
        start = time.perf_counter()
        ray.init(address=f"127.0.0.1:{port}", log_to_driver=False)
        try:
            wait_for_cpus(ray, 2)
            source = RayRows(plan, workers=2, threads=1)
            started = time.perf_counter() - start
            try:
                rows, seconds = timed_rows(source, dataset, indices, repeats)
                nodes_seen = len(set(source.nodes))
            finally:
                source.close()
        finally:
            ray.shutdown()
        if not same_rows(rows, reference):
            raise SystemExit("two nodes: rows differ from the one-process run")
        if nodes_seen != 2:
            raise SystemExit(f"two nodes: the workers ran on {nodes_seen} node(s), not one per node")
        return {"rows": rows, "seconds": seconds, "startup_seconds": round(started, 3), "nodes": nodes_seen}
    finally:
        for node in reversed(nodes):  # stop our own nodes by their process ids
            node.terminate()
            try:
                node.wait(timeout=60)
            except subprocess.TimeoutExpired:
                node.kill()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(DEFAULT_DATA), help="CIFAR-10 data (default: ../shared/data)")
    parser.add_argument("--expert", default="builtin:cifar10-resnet20-sigma0.25")
    parser.add_argument("--examples", type=int, default=8, help="test images certified per pass")
    parser.add_argument("--n0", type=int, default=100)
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--batch", type=int, default=400)
    parser.add_argument("--threads", type=int, default=2, help="threads of the one process = Ray workers")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-two-nodes", action="store_true", help="skip the two-node simulation")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    if not Path(args.data).exists():
        print(f"skipped: no CIFAR-10 data at {args.data} (pass --data)")
        return
    ray = import_ray()
    dataset = load_dataset("cifar10", split="test", data=args.data)
    plan = plan_run(experts=[args.expert], n0=args.n0, n=args.n, alpha=0.001, batch=args.batch)
    indices = list(range(args.examples))
    samples = args.examples * (args.n0 + args.n)
    results = []

    torch.set_num_threads(args.threads)
    plan.threads = args.threads
    local = LocalRows(plan)
    reference, seconds = timed_rows(local, dataset, indices, args.repeats)
    results.append(summary(f"1 process x {args.threads} threads", seconds, samples))

    start = time.perf_counter()
    ray.init(address="local", num_cpus=args.threads, include_dashboard=False, log_to_driver=False)
    init_seconds = time.perf_counter() - start
    start = time.perf_counter()
    source = RayRows(plan, workers=args.threads, threads=1)
    actors_seconds = time.perf_counter() - start
    try:
        rows, seconds = timed_rows(source, dataset, indices, args.repeats)
    finally:
        source.close()
        ray.shutdown()
    if not same_rows(rows, reference):
        raise SystemExit("Ray workers: rows differ from the one-process run")
    results.append(summary(f"{args.threads} Ray workers x 1 thread (local cluster)", seconds, samples,
                           rows_identical=True))
    startup = {"ray_init_local_seconds": round(init_seconds, 3), "actors_ready_seconds": round(actors_seconds, 3)}

    if not args.no_two_nodes:
        tmp = Path(os.environ.get("TMPDIR", "/tmp")) / f"bench-distributed-{os.getpid()}"
        tmp.mkdir(parents=True, exist_ok=True)
        two = two_nodes(plan, dataset, indices, args.repeats, reference, tmp)
        results.append(summary("2 nodes (loopback) x 1 Ray worker x 1 thread", two["seconds"], samples,
                               rows_identical=True, nodes=two["nodes"], startup_seconds=two["startup_seconds"]))

    record = {"expert": args.expert, "examples": args.examples, "N0": args.n0, "N": args.n, "batch": args.batch,
              "repeats": args.repeats, "samples_per_pass": samples, "startup": startup, "results": results,
              "cpu_count": os.cpu_count(), "machine": platform.processor() or platform.machine(),
              "versions": {**versions(), "ray": ray.__version__}}
    for r in results:
        print(f"{r['config']:<50} {r['samples_per_second']:>10.1f} samples/s  (median {r['median_seconds']} s)")
    print(f"Ray start-up: ray.init {startup['ray_init_local_seconds']} s, actors ready "
          f"{startup['actors_ready_seconds']} s")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(record, indent=2) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
