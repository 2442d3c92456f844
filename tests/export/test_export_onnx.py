"""ONNX export: graph contract, parity with torch, collected mismatches, atomic writes."""

from __future__ import annotations

import json

import numpy as np
import pytest

from dualrs_route.experts.errors import ExportMismatchError, ModelFormatError
from dualrs_route.experts.folders import load_folder
from dualrs_route.export import onnx_export
from dualrs_route.export.onnx_export import compare_outputs, export_onnx, validate_onnx

from conftest import TINY_CLASSES, TINY_SHAPE, write_tiny_folder


def _session(path):
    import onnxruntime as ort

    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def test_graph_contract_and_parity_at_several_batch_sizes(exported_folder):
    import torch

    session = _session(exported_folder / "model.onnx")
    (inp,), (out,) = session.get_inputs(), session.get_outputs()
    assert (inp.name, out.name) == ("pixels", "logits")
    assert inp.type == "tensor(float)" and not isinstance(inp.shape[0], int)  # dynamic batch axis
    assert inp.shape[1:] == list(TINY_SHAPE)
    model = load_folder(str(exported_folder)).load_torch_model()
    rng = np.random.default_rng(3)
    for b in (1, 5, 33):
        x = rng.normal(0.5, 0.6, size=(b, *TINY_SHAPE)).astype(np.float32)  # noisy inputs leave [0, 1]
        got = session.run(["logits"], {"pixels": x})[0]
        with torch.inference_mode():
            want = model(torch.from_numpy(x)).numpy()
        assert got.shape == (b, TINY_CLASSES)
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-3)


def test_normalisation_is_inside_the_graph(exported_folder):
    """Changing mean/std in config.json must not matter at run time: the graph carries its own."""
    session = _session(exported_folder / "model.onnx")
    x = np.full((1, *TINY_SHAPE), 0.4, dtype=np.float32)  # == mean: the normalised input is all zeros
    zeros_logits = session.run(["logits"], {"pixels": x})[0]
    import torch

    model = load_folder(str(exported_folder)).load_torch_model()[1]  # the network without NormalizeLayer
    with torch.inference_mode():
        want = model(torch.zeros((1, *TINY_SHAPE))).numpy()
    np.testing.assert_allclose(zeros_logits, want, atol=1e-5)


def test_export_to_out_dir_makes_an_onnx_only_copy(exported_folder, tmp_path):
    out = tmp_path / "copy"
    path = export_onnx(str(exported_folder), out)
    assert path == out / "model.onnx"
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.onnx"]
    assert json.loads((out / "config.json").read_text()) == json.loads((exported_folder / "config.json").read_text())
    folder = load_folder(str(out))
    assert folder.has_onnx and not folder.has_torch_weights


def test_metadata_records_source_hash(exported_folder):
    import onnx

    props = {p.key: p.value for p in onnx.load(str(exported_folder / "model.onnx")).metadata_props}
    assert props["dualrs.source_sha256"] == load_folder(str(exported_folder)).files["model.safetensors"]
    assert float(props["dualrs.sigma"]) == 0.5


def test_every_mismatch_is_collected_into_one_error(exported_folder, tmp_path):
    other = load_folder(str(write_tiny_folder(tmp_path / "other", seed=1))).load_torch_model()
    with pytest.raises(ExportMismatchError) as info:
        validate_onnx(other, exported_folder / "model.onnx", TINY_SHAPE, 0.5, batch_sizes=(1, 7, 64))
    # two input families (uniform, smooth+noise) at three batch sizes, each with logit differences
    assert len(info.value.mismatches) >= 6
    assert {m.split(":")[0] for m in info.value.mismatches} >= {"uniform b=1", "uniform b=7", "uniform b=64"}
    assert "not written" in str(info.value)


def test_failed_validation_leaves_no_file(tmp_path, monkeypatch):
    folder = write_tiny_folder(tmp_path / "fresh")

    def reject(*args, **kwargs):
        raise ExportMismatchError("forced", ["uniform b=1: forced"])

    monkeypatch.setattr(onnx_export, "validate_onnx", reject)
    with pytest.raises(ExportMismatchError):
        export_onnx(str(folder))
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]


def test_onnx_only_folder_cannot_be_exported_again(exported_folder, tmp_path):
    out = tmp_path / "onnx-only"
    export_onnx(str(exported_folder), out, validate=False)
    with pytest.raises(ModelFormatError, match="needs model.safetensors"):
        export_onnx(str(out))


def test_compare_outputs_tolerates_float_ties_but_not_real_flips():
    ref = np.array([[1.0, 1.0 - 1e-7, 0.0], [2.0, 0.0, 0.0]], dtype=np.float32)
    tie = np.array([[1.0 - 1e-7, 1.0, 0.0], [2.0, 0.0, 0.0]], dtype=np.float32)
    assert compare_outputs("tie", ref, tie) == []
    flipped = np.array([[1.0, 1.0 - 1e-7, 0.0], [0.0, 2.0, 0.0]], dtype=np.float32)
    problems = compare_outputs("flip", ref, flipped)
    assert any("argmax differs on 1/2" in p for p in problems) and any("logits differ" in p for p in problems)
    assert "shape" in compare_outputs("shape", ref, ref[:1])[0]


def test_confidence_head_router_exports_with_its_sort(tmp_path):
    """confidence_head sorts probabilities (ONNX TopK): export validates and ORT matches torch."""
    import torch

    from dualrs_route.experts.architectures import build_model
    from dualrs_route.experts.folders import ModelConfig, save_folder

    torch.manual_seed(0)
    args = {"base": "small_cnn", "base_args": {"channels": [4], "hidden": 8}, "base_classes": 5, "hidden": 6}
    model = build_model("confidence_head", num_classes=3, input_shape=TINY_SHAPE, mean=[0.4], std=[0.3], **args)
    config = ModelConfig(kind="expert", sigma=0.5, num_classes=3, input_shape=TINY_SHAPE, mean=(0.4,), std=(0.3,),
                         architecture="confidence_head", architecture_args=args)
    folder = save_folder(tmp_path / "conf", config, model.eval())
    export_onnx(str(folder))
    x = np.random.default_rng(1).normal(0.5, 0.6, size=(17, *TINY_SHAPE)).astype(np.float32)
    got = _session(folder / "model.onnx").run(["logits"], {"pixels": x})[0]
    with torch.inference_mode():
        want = load_folder(str(folder)).load_torch_model()(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-3)


def test_pooled_mlp_router_exports_and_its_pooling_is_one_over_pool_lipschitz(tmp_path):
    """pooled_mlp: block means move by at most ||delta||_2 / pool (what makes its decisions stable), a pool that
    does not divide the image is refused, and the ONNX export matches torch."""
    import torch

    from dualrs_route.experts.architectures import build_model
    from dualrs_route.experts.folders import ModelConfig, save_folder

    torch.manual_seed(0)
    shape = (3, 8, 8)
    model = build_model("pooled_mlp", num_classes=3, input_shape=shape, mean=[0.0] * 3, std=[1.0] * 3, pool=4,
                        hidden=[16, 8]).eval()
    pool = model[1][:2]  # AvgPool2d + Flatten
    x = torch.rand(64, *shape)
    delta = torch.randn(64, *shape)
    delta[::2] = 0
    delta[::2, :, :4, :4] = torch.randn(32, 3, 4, 4)  # perturbations inside one block: the bound is tight there
    moved = (pool(x + delta) - pool(x)).norm(dim=1)
    bound = delta.flatten(1).norm(dim=1) / 4
    assert (moved <= bound * (1 + 1e-5)).all()
    aligned = delta.clone()
    aligned[1::2] = 0
    aligned[1::2, :, :4, :4] = 1.0  # a constant shift of one block attains the bound
    assert torch.allclose((pool(x + aligned) - pool(x)).norm(dim=1)[1::2], aligned.flatten(1).norm(dim=1)[1::2] / 4)
    with pytest.raises(ValueError, match="pool 3 must divide"):
        build_model("pooled_mlp", num_classes=3, input_shape=shape, mean=[0.0] * 3, std=[1.0] * 3, pool=3)
    args = {"pool": 4, "hidden": [16, 8]}
    config = ModelConfig(kind="expert", sigma=1.0, num_classes=3, input_shape=shape, mean=(0.0,) * 3, std=(1.0,) * 3,
                         architecture="pooled_mlp", architecture_args=args)
    folder = save_folder(tmp_path / "pooled", config, model)
    export_onnx(str(folder))
    xs = np.random.default_rng(1).uniform(size=(9, *shape)).astype(np.float32)
    got = _session(folder / "model.onnx").run(["logits"], {"pixels": xs})[0]
    with torch.inference_mode():
        want = load_folder(str(folder)).load_torch_model()(torch.from_numpy(xs)).numpy()
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-4)
