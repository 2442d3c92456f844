"""Hardening case 3: a model with NaN or infinite logits is never certified.

Semantics (also in experts/errors.py, NonFiniteOutputError): any noisy sample with a non-finite
logit stops the certification of that input with one clear error naming the input index; no row
is written for it, and rows already written stay. A model that is NaN on only some noisy inputs
is treated the same way: such a sample is no vote for any class, and dropping it would bias the
estimate of p_A, so there is no sound way to go on.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from dualrs_route.cli import main
from dualrs_route.experts.engine import TorchCounter
from dualrs_route.experts.errors import NonFiniteOutputError
from dualrs_route.experts.noise import NoiseKey, Stage
from rs_oracle import write_linear_folder


class NanAbove(torch.nn.Module):
    """Logits x.sum() * (1, -1), but NaN where the input's mean exceeds ``threshold``."""

    def __init__(self, threshold: float):
        super().__init__()
        self.threshold = threshold

    def forward(self, x):
        s = x.flatten(1).mean(1, keepdim=True)
        logits = torch.cat([s, -s], dim=1)
        return torch.where(s > self.threshold, torch.full_like(logits, float("nan")), logits)


def test_partly_nan_model_raises_naming_the_input_and_never_counts_a_nan():
    counter = TorchCounter(NanAbove(0.9), num_classes=2, input_shape=(1, 4, 4), batch_size=64)
    clean = np.full((1, 4, 4), 0.2, np.float32)
    counts = counter.counts(clean, 0.1, 200, key=NoiseKey(0, 3, Stage.EXPERT_ESTIMATE))
    assert counts.sum() == 200  # finite everywhere near this input: counted as usual
    risky = np.full((1, 4, 4), 0.85, np.float32)  # some noisy copies cross the NaN threshold
    with pytest.raises(NonFiniteOutputError, match="input index 7"):
        counter.counts_many(np.stack([clean, risky]), 0.5, 200,
                            keys=[NoiseKey(0, 3, Stage.EXPERT_ESTIMATE), NoiseKey(0, 7, Stage.EXPERT_ESTIMATE)])


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_cli_refuses_a_nan_or_inf_model_with_one_line_and_no_row(tmp_path, bad):
    weight = np.ones((3, 16), np.float32)
    weight[1, 0] = bad
    folder = write_linear_folder(tmp_path / "bad", weight=weight, bias=np.zeros(3, np.float32), sigma=0.25,
                                 input_shape=(1, 4, 4))
    x = np.random.default_rng(0).uniform(0.1, 1, size=(4, 1, 4, 4)).astype(np.float32)
    np.savez(tmp_path / "d.npz", x=x, y=np.zeros(4, np.int64))
    out = tmp_path / "r.tsv"
    result = CliRunner().invoke(main, ["certify", "--expert", str(folder), "--dataset", f"npz:{tmp_path / 'd.npz'}",
                                       "--N0", "10", "--N", "50", "--quiet", "--out", str(out)])
    assert result.exit_code == 1, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and "NaN or infinite logits for input index 0" in errors[0], result.output
    assert "Traceback" not in result.output
    rows = out.read_text().splitlines() if out.exists() else []
    assert len(rows) <= 1  # at most the header: no certificate for a NaN model


def test_ort_engine_refuses_nan_logits_too(tmp_path):
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    weight = np.ones((3, 16), np.float32)
    weight[2, 5] = float("nan")
    folder = write_linear_folder(tmp_path / "bad", weight=weight, bias=np.zeros(3, np.float32), sigma=0.25,
                                 input_shape=(1, 4, 4))
    assert CliRunner().invoke(main, ["export", str(folder), "--to", "onnx", "--no-validate"]).exit_code == 0
    from dualrs_route.experts.folders import load_folder
    from dualrs_route.export.engines import make_counter

    counter = make_counter(load_folder(str(folder)), engine="onnxruntime")
    with pytest.raises(NonFiniteOutputError, match="input index 5"):
        counter.counts(np.full((1, 4, 4), 0.5, np.float32), 0.25, 20, key=NoiseKey(0, 5, Stage.EXPERT_SELECT))
    assert Path(folder, "model.onnx").is_file()


@pytest.mark.parametrize("ref", ["builtin:../zoo/digits-router", "builtin:../../router/zoo/digits-router",
                                 "builtin:/etc", "builtin:digits-router/../digits-router"])
def test_builtin_references_accept_names_only(ref):
    from dualrs_route.experts.errors import ModelNotFoundError
    from dualrs_route.experts.folders import load_folder

    with pytest.raises(ModelNotFoundError, match="no built-in model named"):
        load_folder(ref)
    assert load_folder("builtin:digits-router").revision == "builtin"
