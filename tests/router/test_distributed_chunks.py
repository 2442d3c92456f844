"""``labels --ray`` and ``router-scores --ray``: Ray workers compute the chunks, the driver writes
them in order, so the file is the one of a single process, also when a worker dies.

One local Ray cluster (2 CPUs) serves the module (test_distributed.py keeps two actors busy
on its own cluster, so the two files cannot share one). The generic :class:`RayChunks` is
checked with a trivial job whose chunks sleep, or kill their worker, on purpose.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from dualrs_route.cli import main
from dualrs_route.experts.errors import DualRSError

ray = pytest.importorskip("ray")
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # actors get ToyJob without importing tests/

EXPERTS = ["--expert", "builtin:digits-sigma0.25", "--expert", "builtin:digits-sigma0.5"]
LABELS = ["labels", *EXPERTS, "--max", 24, "--N0", 5, "--N", 20, "--chunk", 4, "--batch", 50, "--seed", 3,
          "--quiet"]
SCORES = ["router-scores", "--router", "builtin:digits-router", "--max", 24, "--router-N0", 5, "--router-N", 20,
          "--chunk", 4, "--batch", 50, "--seed", 3, "--quiet"]


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def npz(path) -> dict:
    with np.load(path, allow_pickle=False) as archive:
        return {k: archive[k] for k in archive.files}


def same_arrays(a: dict, b: dict) -> None:
    assert set(a) == set(b)
    for key in set(a) - {"meta"}:
        assert a[key].shape == b[key].shape and np.array_equal(a[key], b[key]), key


@pytest.fixture(scope="module")
def cluster():
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield ray
    ray.shutdown()


@pytest.mark.parametrize("command", [LABELS, SCORES], ids=["labels", "router-scores"])
def test_two_ray_workers_write_the_file_of_one_process(cluster, command, tmp_path):
    import json

    single = invoke(*command, "--out", tmp_path / "one.npz")
    assert single.exit_code == 0, single.output
    result = invoke(*command, "--ray", "--workers", 2, "--out", tmp_path / "ray.npz")
    assert result.exit_code == 0, result.output
    one, many = npz(tmp_path / "one.npz"), npz(tmp_path / "ray.npz")
    same_arrays(one, many)
    assert len(one["indices" if command is LABELS else "idx"]) == 24  # six chunks of four images
    one_meta, many_meta = json.loads(str(one["meta"])), json.loads(str(many["meta"]))
    if command is LABELS:
        assert one_meta["settings"] == many_meta["settings"] and many_meta["complete"]
        assert np.any(one["radii"] > 0)  # the experts certify something: the comparison is not of zeros
    else:
        assert one_meta == many_meta  # engine and noise recorded from the workers equal this process's


def test_killing_a_worker_mid_labels_run_loses_nothing(cluster, tmp_path):
    from dualrs_route.experts.data import load_dataset
    from dualrs_route.experts.folders import load_folder
    from dualrs_route.router.distributed import RayChunks
    from dualrs_route.router.labels import compute_labels

    folders = [load_folder(ref, expected_kind="expert") for ref in EXPERTS[1::2]]
    ds = load_dataset("digits", split="train")
    indices = np.arange(24)
    settings = dict(n0=5, n=20, seed=3, batch=50, chunk=4)
    single = compute_labels(folders, ds, indices, out=tmp_path / "one.npz", **settings)
    pools, chunks_written = [], []

    def start(job):
        pools.append(RayChunks(job, workers=2, threads=1))
        return pools[0]

    def kill_after_first_chunk(images):
        chunks_written.append(images)
        if len(chunks_written) == 1:
            os.kill(pools[0].pids[0], signal.SIGKILL)

    killed = compute_labels(folders, ds, indices, out=tmp_path / "killed.npz", workers=start,
                            progress=kill_after_first_chunk, **settings)
    assert pools[0].retried >= 1  # the killed worker's chunk really was re-sent (its restart may come too late)
    same_arrays(npz(tmp_path / "killed.npz"), npz(tmp_path / "one.npz"))
    assert np.array_equal(killed.radii, single.radii)


# --- RayChunks itself, with a toy job (one pool of two actors for the tests below, in this order) ---


class Toy:
    """A chunk ``x`` is ``10 x``, after ``delay`` seconds; with ``marker`` its worker dies the first
    time (the marker file records it), with ``always`` every time."""

    engines = "toy"

    def __call__(self, x: int, delay: float = 0.0, marker: str = "", always: bool = False) -> int:
        time.sleep(delay)
        if marker and (always or not Path(marker).exists()):
            Path(marker).touch()
            os._exit(1)  # the worker process dies, as if killed
        return 10 * x


@dataclasses.dataclass
class ToyJob:
    folders: tuple = ()
    device: str = "cpu"

    def build(self) -> Toy:
        return Toy()


@pytest.fixture(scope="module")
def toy_pool(cluster):
    from dualrs_route.router.distributed import RayChunks

    pool = RayChunks(ToyJob(), workers=2, threads=1)
    yield pool
    pool.close()


def test_chunks_come_back_in_order_when_later_ones_finish_first(toy_pool):
    results = list(toy_pool.map(range(6), lambda c: (c, 1.5 if c == 0 else 0.0)))
    assert results == [0, 10, 20, 30, 40, 50]


def test_a_chunk_whose_worker_died_is_sent_again(toy_pool, tmp_path):
    marker = tmp_path / "died"
    before = toy_pool.retried
    results = list(toy_pool.map(range(6), lambda c: (c, 0.0, str(marker) if c == 2 else "")))
    assert marker.exists() and toy_pool.retried == before + 1
    assert results == [0, 10, 20, 30, 40, 50]


def test_a_chunk_that_always_kills_its_worker_stops_the_run(toy_pool, tmp_path):
    from dualrs_route.router.distributed import MAX_CHUNK_REQUEUES

    def args_of(c):
        return (c, 0.0, str(tmp_path / "died") if c == 1 else "", True)

    with pytest.raises(DualRSError, match=f"^chunk 2 of 4 ended its Ray worker {MAX_CHUNK_REQUEUES + 1} times"):
        list(toy_pool.map(range(4), args_of))  # three deaths on two actors: a restarted one took it again


def test_ray_options_need_ray_for_labels(tmp_path):
    result = invoke(*LABELS, "--workers", 2, "--out", tmp_path / "x.npz")
    assert result.exit_code == 2 and "--workers and --gpus-per-worker need --ray" in result.output
    assert not (tmp_path / "x.npz").exists()


@pytest.mark.parametrize("command", [LABELS, SCORES], ids=["labels", "router-scores"])
def test_missing_ray_gives_the_install_hint_and_no_file(command, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray now raises ImportError
    result = invoke(*command, "--ray", "--out", tmp_path / "x.npz")
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 1 and lines == ["Error: Ray is not installed; install it with: "
                                               "pip install 'dualrs-route[distributed]'"], result.output
    assert not (tmp_path / "x.npz").exists() and not (tmp_path / "x.npz.parts").exists()
