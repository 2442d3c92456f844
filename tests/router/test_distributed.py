"""``certify --ray``: Ray workers give the file of one process (but for time), also when a worker is killed.

One local Ray cluster (2 CPUs) serves the module; the digits demo router with its three experts,
a small N and a few examples keep each run short.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from dualrs_route.cli import main
from dualrs_route.experts.errors import DualRSError

ray = pytest.importorskip("ray")

ROUTER = "builtin:digits-router"
COMMON = ["--router", ROUTER, "--N0", 10, "--N", 200, "--alpha", 0.01, "--seed", 5, "--max", 24, "--batch", 100,
          "--quiet"]


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def without_time(path) -> list[str]:
    lines = Path(path).read_text().split("\n")
    t = lines[0].split("\t").index("time")
    return ["\t".join(c if k != t else "" for k, c in enumerate(line.split("\t"))) for line in lines]


@pytest.fixture(scope="module")
def cluster():
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    out = tmp_path_factory.mktemp("single") / "single.tsv"
    result = invoke("certify", *COMMON, "--out", out)
    assert result.exit_code == 0, result.output
    return out


def test_two_ray_workers_write_the_file_of_one_process(cluster, one_process, tmp_path):
    out = tmp_path / "ray.tsv"
    result = invoke("certify", *COMMON, "--ray", "--workers", 2, "--out", out)
    assert result.exit_code == 0, result.output
    assert without_time(out) == without_time(one_process)
    assert Path(out).read_text() != Path(one_process).read_text()  # times differ: the comparison is not trivial


@pytest.fixture(scope="module")
def workers(cluster):
    """Two warm Ray workers shared by the tests below (starting actors is the slow part)."""
    from dualrs_route.router.distributed import RayRows
    from dualrs_route.router.run import plan_run

    plan = plan_run(router=ROUTER, n0=10, n=200, alpha=0.01, seed=5, batch=100)
    source = RayRows(plan, workers=2, threads=1)
    yield plan, source
    source.close()


class Borrowed:
    """A row source that leaves the shared workers running when execute() closes it."""

    def __init__(self, source):
        self.source, self.engines = source, source.engines

    def rows(self, *args):
        return self.source.rows(*args)

    def close(self):
        pass


def run_on(workers, out, progress=None, dataset=None):
    from dualrs_route.experts.data import load_dataset
    from dualrs_route.router.run import execute

    plan, source = workers
    dataset = load_dataset("digits", split="test") if dataset is None else dataset
    execute(plan, dataset, skip=1, max_index=24, out_path=out, data=None, command="test", progress=progress,
            rows=lambda p: Borrowed(source))


def test_ray_resumes_a_file_that_one_process_started(workers, one_process, tmp_path):
    out = tmp_path / "resumed.tsv"
    lines = Path(one_process).read_text().splitlines(keepends=True)
    out.write_text("".join(lines[:9]))  # header and 8 rows, as a killed one-process run
    Path(str(out) + ".json").write_text(Path(str(one_process) + ".json").read_text())
    run_on(workers, out)
    assert Path(out).read_text().splitlines()[:9] == [line.rstrip("\n") for line in lines[:9]]
    assert without_time(out) == without_time(one_process)


def test_killing_a_worker_mid_run_loses_nothing(workers, one_process, tmp_path):
    _, source = workers
    before = source.retried

    def kill_after_first_row(items, length):
        for k, row in enumerate(items):
            if k == 1:
                os.kill(source.pids[0], signal.SIGKILL)
            yield row

    out = tmp_path / "killed.tsv"
    run_on(workers, out, progress=kill_after_first_row)
    assert source.retried > before  # the killed worker's pending examples really were re-queued
    assert without_time(out) == without_time(one_process)


class EndsItsProcess:
    """Unpickled in the Ray worker that receives it (as a call's argument), it ends that process at once."""

    def __reduce__(self):
        return os._exit, (1,)


KILLER = 5


def killer_digits():
    """The digits test split, but example KILLER's image ends the worker that gets it (as a crash would)."""
    from dualrs_route.experts.data import Dataset, load_dataset

    class Killer(Dataset):
        def image(self, i):
            return EndsItsProcess() if i == KILLER else super().image(i)

    digits = load_dataset("digits", split="test")
    return Killer(digits.name, digits.split, digits.images, digits.labels, digits.class_names)


def test_an_example_that_keeps_killing_its_worker_stops_the_run_naming_it(workers, one_process, tmp_path):
    from dualrs_route.router.distributed import MAX_REQUEUES

    _, source = workers
    before = source.retried
    out = tmp_path / "killer.tsv"
    with pytest.raises(DualRSError, match=f"^example {KILLER} ended its Ray worker {MAX_REQUEUES + 1} times"):
        run_on(workers, out, dataset=killer_digits())
    assert source.retried - before >= MAX_REQUEUES  # it was re-queued (so were calls that shared its worker)
    written = Path(out).read_text().splitlines()
    assert [line.split("\t")[0] for line in written[1:]] == [str(i) for i in range(KILLER)]  # in order, up to it
    assert json.loads(Path(str(out) + ".json").read_text())["complete"] is False
    run_on(workers, out)  # the cause fixed, the same run resumes after the rows written
    assert without_time(out) == without_time(one_process)


def test_an_error_inside_a_worker_is_raised_as_itself(cluster):
    from types import SimpleNamespace

    from dualrs_route.experts.errors import DataError
    from dualrs_route.router.distributed import RayRows

    @ray.remote(num_cpus=0)  # the shared workers hold both CPUs
    def fails():
        raise DataError("example 3 is not finite")

    with pytest.raises(DataError, match="^example 3 is not finite$"):
        RayRows._get(SimpleNamespace(ray=ray), fails.remote())


def test_a_worker_that_sees_other_model_files_refuses(tmp_path, linear_folder):
    import numpy as np

    from dualrs_route.router.distributed import check_model_files
    from dualrs_route.router.run import plan_run

    folder = linear_folder("lin", weight=np.eye(3, 16, dtype=np.float32), bias=np.zeros(3, np.float32), sigma=0.25,
                           input_shape=(1, 4, 4))
    plan = plan_run(experts=[str(folder)], n=10)
    check_model_files(plan)  # same files: fine
    weights = folder / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1  # the same size, one bit changed
    weights.write_bytes(bytes(data))
    with pytest.raises(DualRSError, match="model.safetensors is different"):
        check_model_files(plan)


def test_ray_options_need_ray(tmp_path):
    result = invoke("certify", *COMMON, "--workers", 2, "--out", tmp_path / "x.tsv")
    assert result.exit_code == 2 and "--workers and --gpus-per-worker need --ray" in result.output


def test_missing_ray_gives_the_install_hint(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray now raises ImportError
    result = invoke("certify", *COMMON, "--ray", "--out", tmp_path / "x.tsv")
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 1 and lines == ["Error: Ray is not installed; install it with: "
                                               "pip install 'dualrs-route[distributed]'"], result.output
    assert not (tmp_path / "x.tsv").exists()


def test_workers_that_do_not_fit_the_cluster_are_refused_before_starting(cluster):
    from dualrs_route.router.distributed import check_resources

    check_resources(ray, 2, 1, 0.0)  # the module's cluster: 2 CPUs, no GPU
    with pytest.raises(DualRSError, match="3 Ray workers x \\(1 CPU, 0 GPU\\) need 3 CPU but the Ray cluster has 2"):
        check_resources(ray, 3, 1, 0.0)
    with pytest.raises(DualRSError, match="need 2 GPU but the Ray cluster has 0"):
        check_resources(ray, 2, 1, 1.0)
