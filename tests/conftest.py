"""Shared fixtures: tiny model folders, npz datasets and exact randomized-smoothing oracles.

Exact reference math lives in ``tests/rs_oracle.py`` (plain functions, importable from every
test module because this folder is put on ``sys.path`` here, whatever pytest's import mode).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from rs_oracle import write_linear_folder  # noqa: E402  (needs the sys.path line above)


@pytest.fixture(autouse=True)
def _few_threads():
    """Keep torch on one thread: the test machines have 2 shared cores."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def linear_folder(tmp_path):
    """Factory: ``linear_folder(name, weight=[K, D], bias=[K], sigma=..., ...)`` -> folder Path under tmp_path."""

    def make(name: str = "expert", **kwargs) -> Path:
        return write_linear_folder(tmp_path / name, **kwargs)

    return make


@pytest.fixture
def npz_dataset(tmp_path):
    """Factory: ``npz_dataset(x, y, name="data.npz")`` -> path of an npz with arrays x and y."""

    def make(x, y, name: str = "data.npz") -> Path:
        path = tmp_path / name
        np.savez(path, x=np.asarray(x), y=np.asarray(y))
        return path

    return make


@pytest.fixture
def cli_expert(tmp_path):
    """A 3-class linear expert on 1x4x4 inputs plus a 24-image float32 npz dataset that fits it.

    Returns (expert folder, dataset path, weight, bias). Labels are the clean linear predictions,
    so most rows certify with the right class.
    """
    rng = np.random.default_rng(7)
    weight = rng.normal(size=(3, 16)).astype(np.float32)
    bias = rng.normal(scale=0.1, size=3).astype(np.float32)
    folder = write_linear_folder(tmp_path / "lin3", weight=weight, bias=bias, sigma=0.25, input_shape=(1, 4, 4))
    x = rng.uniform(size=(24, 1, 4, 4)).astype(np.float32)
    y = np.argmax(x.reshape(24, -1) @ weight.T + bias, axis=1).astype(np.int64)
    data = tmp_path / "data.npz"
    np.savez(data, x=x, y=y)
    return folder, data, weight, bias


def read_json(path) -> dict:
    return json.loads(Path(path).read_text())
