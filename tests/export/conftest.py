"""Fixtures for the export/runtime tests: tiny small_cnn expert folders, exported once per session."""

from __future__ import annotations

import shutil

import pytest

from dualrs_route.experts.architectures import build_model
from dualrs_route.experts.folders import ModelConfig, save_folder

TINY_SHAPE = (1, 8, 8)
TINY_CLASSES = 4
TINY_SIGMA = 0.5


def write_tiny_folder(path, *, seed: int = 0, sigma: float = TINY_SIGMA, kind: str = "expert",
                      experts: tuple[str, ...] | None = None):
    """A randomly initialised small_cnn (1x8x8 -> 4 classes, or one output per expert for a router) as a folder."""
    import torch

    torch.manual_seed(seed)
    args = {"channels": [4, 8], "hidden": 16}
    classes = len(experts) if kind == "router" else TINY_CLASSES
    model = build_model("small_cnn", num_classes=classes, input_shape=TINY_SHAPE, mean=[0.4], std=[0.3], **args)
    with torch.no_grad():  # non-trivial BN statistics, so the exported graph's BN folding is exercised
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
    config = ModelConfig(kind=kind, sigma=sigma, num_classes=classes, experts=experts, input_shape=TINY_SHAPE, mean=(0.4,),
                         std=(0.3,), architecture="small_cnn", architecture_args=args, name=path.name)
    return save_folder(path, config, model.eval())


@pytest.fixture(scope="session")
def exported_folder(tmp_path_factory):
    """A tiny expert folder holding model.safetensors, model.onnx (validated) and model.int8.onnx.

    Session-scoped to keep the suite fast; tests that modify a folder copy it first (``folder_copy``).
    """
    from dualrs_route.export.onnx_export import export_onnx
    from dualrs_route.export.quantize import quantize_int8

    folder = write_tiny_folder(tmp_path_factory.mktemp("tiny") / "tiny-expert")
    export_onnx(str(folder))
    quantize_int8(str(folder), samples=128)
    return folder


@pytest.fixture
def folder_copy(exported_folder, tmp_path):
    """A private copy of :func:`exported_folder` that a test may modify."""
    target = tmp_path / exported_folder.name
    shutil.copytree(exported_folder, target)
    return target


@pytest.fixture
def tiny_router(tmp_path):
    """A router folder (sigma_e = 1.0) over two tiny experts (sigma 0.25 and 1.0), experts listed relatively."""
    write_tiny_folder(tmp_path / "e-low", seed=1, sigma=0.25)
    write_tiny_folder(tmp_path / "e-high", seed=2, sigma=1.0)
    return write_tiny_folder(tmp_path / "router", seed=3, sigma=1.0, kind="router", experts=("../e-low", "../e-high"))
