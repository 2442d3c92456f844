"""Hardening cases 6, 7, 8 and the npz hint of 11: hostile inputs end in one line, never a traceback.

* Case 6: architecture_args with bad values or a huge width; an npz that is not a zip; a CIFAR
  batch without b'data' or one that is a list; analyze on our TSV with a short row; a sidecar
  that is a JSON list or string (analyze and resume); train-expert with a corrupt checkpoint.pt.
* Case 7: budgets beyond the documented caps (N, N0 <= 10^9; a 4 GiB noise buffer) are refused
  up front, before any output.
* Case 8: analyze checks every value: radius (negative, NaN), correct against predict and label,
  duplicate idx, and --radii.
* Case 11: a text file passed as npz gets no hint to use allow_pickle.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest

from dualrs_route.experts.data import load_dataset
from dualrs_route.experts.errors import DataError
from dualrs_route.router.results import sidecar_path
from hostile import certify_args, invoke, one_error_line

# --- case 6: models, data files, result files, checkpoints ---


@pytest.mark.parametrize("arch, args, mentions", [
    ("small_cnn", {"hidden": -1}, "must be >= 1"),
    ("small_cnn", {"hidden": 10**8}, "the limit is 1,000,000,000"),
    ("small_cnn", {"channels": [16, 0]}, "must be >= 1"),
    ("small_cnn", {"hidden": "wide"}, "cannot be built"),
    ("linear", {"bogus": 3}, "cannot be built"),
])
def test_architecture_args_with_bad_values(cli_expert, tmp_path, arch, args, mentions):
    folder, data, _, _ = cli_expert
    config = json.loads((folder / "config.json").read_text())
    config.update(architecture=arch, architecture_args=args)
    (folder / "config.json").write_text(json.dumps(config))
    out = tmp_path / "r.tsv"
    assert mentions in one_error_line(invoke(*certify_args(folder, data, out)))
    assert not out.exists()


def test_train_expert_refuses_bad_architecture_args(tmp_path):
    result = invoke("train-expert", "--sigma", 0.25, "--epochs", 1, "--arch-args", '{"hidden": 100000000}',
                    "--quiet", "--out", tmp_path / "m")
    one_error_line(result, mentions="parameters; the limit is")


NOT_NPZ = {
    "text": (b"x,y\n0.1,3\n", "is not an npz file"),
    "binary": (bytes(range(256)), "is not an npz file"),
    "empty": (b"", "is not an npz file"),
    "truncated zip": (b"PK\x03\x04" + b"\0" * 40, "cannot read"),
}


@pytest.mark.parametrize("content, mentions", NOT_NPZ.values(), ids=NOT_NPZ.keys())
def test_npz_that_is_not_a_zip(cli_expert, tmp_path, content, mentions):
    folder, _, _, _ = cli_expert
    path = tmp_path / "fake.npz"
    path.write_bytes(content)
    line = one_error_line(invoke(*certify_args(folder, path, tmp_path / "r.tsv")), mentions=str(path))
    assert mentions in line and "pickle" not in line


def test_npz_with_object_arrays_is_refused_without_the_allow_pickle_hint(tmp_path):
    path = tmp_path / "objects.npz"
    np.savez(path, x=np.array([{"a": 1}], dtype=object), y=np.zeros(1, np.int64))
    with pytest.raises(DataError) as info:
        load_dataset(f"npz:{path}")
    assert "allow_pickle" not in str(info.value) and "not loaded" in str(info.value)


CIFAR_BATCHES = {
    "no data": {b"labels": [1, 2]},
    "a list": [1, 2, 3],
    "wrong data shape": {b"data": np.zeros((2, 10), np.uint8), b"labels": [1, 2]},
    "labels of another length": {b"data": np.zeros((2, 3072), np.uint8), b"labels": [1]},
}


@pytest.mark.parametrize("entry", CIFAR_BATCHES.values(), ids=CIFAR_BATCHES.keys())
def test_cifar_batch_of_the_wrong_shape(cli_expert, tmp_path, entry):
    folder, _, _, _ = cli_expert
    batches = tmp_path / "cifar-10-batches-py"
    batches.mkdir()
    (batches / "test_batch").write_bytes(pickle.dumps(entry))
    with pytest.raises(DataError, match="is not a CIFAR batch file"):
        load_dataset("cifar10", data=str(tmp_path))
    result = invoke("certify", "--expert", folder, "--dataset", "cifar10", "--data", tmp_path, "--quiet")
    one_error_line(result, mentions="not a CIFAR batch file")


def test_a_real_cifar_layout_still_loads(tmp_path):
    batches = tmp_path / "cifar-10-batches-py"
    batches.mkdir()
    data = np.arange(2 * 3072, dtype=np.int64).astype(np.uint8).reshape(2, 3072)
    (batches / "test_batch").write_bytes(pickle.dumps({b"data": data, b"labels": [3, 7]}))
    ds = load_dataset("cifar10", data=str(tmp_path))
    assert ds.labels.tolist() == [3, 7] and ds.images.shape == (2, 32, 32, 3)
    assert ds.images[1, 0, 0, 0] == data[1, 0] and ds.images[1, 0, 0, 1] == data[1, 1024]


def our_results(cli_expert, tmp_path) -> tuple[Path, list]:
    folder, data, _, _ = cli_expert
    out = tmp_path / "r.tsv"
    assert invoke(*certify_args(folder, data, out)).exit_code == 0
    return out, certify_args(folder, data, out)


def test_analyze_our_tsv_with_a_short_row(cli_expert, tmp_path):
    out, _ = our_results(cli_expert, tmp_path)
    lines = out.read_text().splitlines()
    lines[3] = "\t".join(lines[3].split("\t")[:3])
    out.write_text("\n".join(lines) + "\n")
    line = one_error_line(invoke("analyze", out), mentions=f"{out}, line 4")
    assert "3 fields" in line


@pytest.mark.parametrize("content", ["[1, 2]", '"text"', "3", '{"settings": []}'])
def test_sidecar_that_is_not_an_object_in_analyze_and_resume(cli_expert, tmp_path, content):
    out, args = our_results(cli_expert, tmp_path)
    sidecar_path(out).write_text(content)
    before = out.read_bytes()
    one_error_line(invoke("analyze", out), mentions="not a dualrs-route sidecar")
    one_error_line(invoke(*args), mentions="not a dualrs-route sidecar")
    assert out.read_bytes() == before


@pytest.mark.parametrize("content", [b"garbage", b"PK\x03\x04" + b"\0" * 100, "list"])
def test_train_expert_with_a_corrupt_checkpoint(tmp_path, content):
    import torch

    out = tmp_path / "m"
    out.mkdir()
    if content == "list":
        torch.save([1, 2, 3], out / "checkpoint.pt")
    else:
        (out / "checkpoint.pt").write_bytes(content)
    result = invoke("train-expert", "--sigma", 0.25, "--epochs", 1, "--fraction", 0.05, "--quiet", "--out", out)
    one_error_line(result, mentions="not a readable training checkpoint; delete it")


# --- case 7: budgets ---


@pytest.mark.parametrize("extra, mentions", [
    (["--N", 10**12], "--N must be <= 1,000,000,000"),
    (["--N0", 10**10], "--N0 must be <= 1,000,000,000"),
    (["--batch", 10**9], "GiB noise buffer"),
])
def test_absurd_budgets_are_refused_up_front(cli_expert, tmp_path, extra, mentions):
    folder, data, _, _ = cli_expert
    out = tmp_path / "r.tsv"
    result = invoke(*certify_args(folder, data, out, *extra))
    one_error_line(result, mentions=mentions)
    assert result.exit_code == 2 and not out.exists() and not sidecar_path(out).exists()


def test_router_budget_is_capped_too(tmp_path):
    result = invoke("certify", "--router", "builtin:digits-router", "--router-N", 2 * 10**9, "--quiet",
                    "--out", tmp_path / "r.tsv")
    one_error_line(result, mentions="--router-N must be <= 1,000,000,000")


def test_budget_limits_are_stated_in_help():
    text = " ".join(invoke("certify", "--help").output.split())
    assert "at most 10^9" in text and "At most 4 GiB of float32 noise" in text


# --- case 8: analyze validates values ---


def cohen_file(path: Path, rows) -> Path:
    path.write_text("idx\tlabel\tpredict\tradius\tcorrect\ttime\n"
                    + "".join("\t".join(map(str, r)) + "\t0:00:00.1\n" for r in rows))
    return path


GOOD = [(0, 1, 1, 0.5, 1), (1, 2, 0, 0.3, 0), (2, 3, -1, 0.0, 0)]


@pytest.mark.parametrize("bad_row, mentions", [
    ((3, 1, 1, -1.0, 1), "radius -1 is negative"),
    ((3, 1, 1, "nan", 1), "radius = 'nan'"),
    ((3, 1, 1, 0.5, 0), "disagrees with predict 1 and label 1"),
    ((3, 1, 2, 0.5, 1), "disagrees with predict 2 and label 1"),
    ((1, 1, 1, 0.5, 1), "idx 1 appears twice"),
])
def test_analyze_refuses_bad_values_naming_file_and_line(tmp_path, bad_row, mentions):
    path = cohen_file(tmp_path / "c.tsv", GOOD + [bad_row])
    line = one_error_line(invoke("analyze", path), mentions=f"{path}, line 5")
    assert mentions in line


@pytest.mark.parametrize("radii", ["nan", "0,-0.5", "0,inf"])
def test_analyze_refuses_bad_radii(tmp_path, radii):
    path = cohen_file(tmp_path / "c.tsv", GOOD)
    assert invoke("analyze", path).exit_code == 0
    one_error_line(invoke("analyze", path, "--radii", radii), mentions="radii must be finite numbers >= 0")
