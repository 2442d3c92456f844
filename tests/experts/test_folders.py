"""Model folders: config validation, strict loading, the architecture registry, data loading."""

from __future__ import annotations

import json

import numpy as np
import pytest

from dualrs_route.experts import architectures
from dualrs_route.experts.data import check_images, load_dataset, select_indices
from dualrs_route.experts.errors import DataError, ModelFormatError
from dualrs_route.experts.folders import ModelConfig, builtin_names, load_folder, save_folder
from dualrs_route.export.engines import make_counter
from rs_oracle import write_linear_folder

BASE = {"kind": "expert", "sigma": 0.5, "num_classes": 3, "input_shape": [1, 4, 4], "architecture": "linear"}


@pytest.mark.parametrize("change,fragment", [
    ({"kind": "teacher"}, "kind"), ({"sigma": 0}, "sigma"), ({"sigma": -1}, "sigma"), ({"sigma": "0.5"}, "sigma"),
    ({"sigma": True}, "sigma"), ({"input_shape": [4, 4]}, "input_shape"), ({"input_shape": [1, 0, 4]}, "input_shape"),
    ({"num_classes": 0}, "num_classes"), ({"mean": [0.1, 0.2]}, "mean"), ({"std": [0.0]}, "std"),
    ({"class_names": ["a"]}, "class_names"), ({"experts": ["x"]}, "experts"), ({"architecture": 3}, "architecture"),
    ({"architecture_args": [1]}, "architecture_args"),
])
def test_config_validation(change, fragment):
    with pytest.raises(ModelFormatError, match=fragment):
        ModelConfig.from_dict({**BASE, **change}, "src")


def test_config_roundtrip_and_router_defaults():
    cfg = ModelConfig.from_dict({**BASE, "class_names": ["a", "b", "c"], "note": "kept"}, "src")
    assert ModelConfig.from_dict(cfg.to_dict(), "again") == cfg and cfg.extra == {"note": "kept"}
    router = ModelConfig.from_dict({**BASE, "kind": "router", "num_classes": 2, "experts": ["a", "b"]}, "r")
    assert router.experts == ("a", "b")
    assert ModelConfig.from_dict({k: v for k, v in {**BASE, "kind": "router", "experts": ["a"]}.items()
                                  if k != "num_classes"}, "r").num_classes == 1
    with pytest.raises(ModelFormatError, match="experts"):
        ModelConfig.from_dict({**BASE, "kind": "router"}, "r")


def test_strict_loading_reports_missing_and_unexpected_keys(tmp_path):
    from safetensors.torch import load_file, save_file

    folder = write_linear_folder(tmp_path / "e", weight=np.ones((3, 16)), bias=np.zeros(3), sigma=0.5,
                                 input_shape=(1, 4, 4))
    state = load_file(str(folder / "model.safetensors"))
    save_file({"1.1.weight": state["1.1.weight"]}, str(folder / "model.safetensors"))
    with pytest.raises(ModelFormatError, match="missing 1 keys"):
        load_folder(str(folder)).load_torch_model()
    save_file({**state, "extra": state["1.1.bias"].clone()}, str(folder / "model.safetensors"))
    with pytest.raises(ModelFormatError, match="unexpected 1 keys"):
        load_folder(str(folder)).load_torch_model()


def test_save_folder_refuses_to_overwrite(tmp_path):
    folder = write_linear_folder(tmp_path / "e", weight=np.ones((2, 4)), bias=np.zeros(2), sigma=0.5)
    cfg = load_folder(str(folder)).config
    with pytest.raises(FileExistsError):
        save_folder(folder, cfg)
    save_folder(folder, cfg, overwrite=True)
    assert not list(folder.glob("*.tmp"))


@pytest.mark.parametrize("name", architectures.available())
def test_every_registered_architecture_roundtrips_through_a_folder(tmp_path, name):
    import torch

    shape = (3, 32, 32) if name.startswith("cifar") else (1, 8, 8)
    model = architectures.build_model(name, num_classes=4, input_shape=shape, mean=[0.5] * shape[0],
                                      std=[0.25] * shape[0]).eval()
    cfg = ModelConfig(kind="expert", sigma=0.25, num_classes=4, input_shape=shape, mean=(0.5,) * shape[0],
                      std=(0.25,) * shape[0], architecture=name)
    save_folder(tmp_path / name, cfg, model)
    loaded = load_folder(str(tmp_path / name)).load_torch_model()
    x = torch.rand(2, *shape)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x))
    assert make_counter(load_folder(str(tmp_path / name))).num_classes == 4


def test_normalisation_is_inside_the_model():
    import torch

    model = architectures.build_model("linear", num_classes=2, input_shape=(1, 1, 2), mean=[0.5], std=[0.25])
    with torch.no_grad():
        model[1][1].weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
        model[1][1].bias.zero_()
        out = model(torch.tensor([[[[0.75, 0.5]]]]))
    torch.testing.assert_close(out, torch.tensor([[1.0, 0.0]]))
    assert not [k for k in model.state_dict() if k.startswith("0.")]  # no state-dict keys for the normaliser


def test_builtin_experts_load():
    names = builtin_names()
    for name in names:
        folder = load_folder("builtin:" + name)
        assert folder.revision == "builtin" and folder.config.sigma > 0


def test_select_indices_cohen_semantics():
    assert select_indices(10, 3, -1) == [0, 3, 6, 9]
    assert select_indices(10, 3, 7) == [0, 3, 6]
    assert select_indices(10, 1, 100) == list(range(10))
    with pytest.raises(DataError):
        select_indices(10, 0)


def test_npz_datasets_uint8_and_float(tmp_path):
    u8 = np.arange(2 * 4 * 4 * 3, dtype=np.uint8).reshape(2, 4, 4, 3)
    np.savez(tmp_path / "u8.npz", x=u8, y=np.array([0, 1]))
    ds = load_dataset(f"npz:{tmp_path / 'u8.npz'}")
    assert ds.input_shape == (3, 4, 4)
    np.testing.assert_allclose(ds.image(1), u8[1].transpose(2, 0, 1) / 255.0, rtol=1e-6)
    check_images(ds, [0, 1], (3, 4, 4))
    np.savez(tmp_path / "noy.npz", x=u8)
    with pytest.raises(DataError, match="'x' and 'y'"):
        load_dataset(f"npz:{tmp_path / 'noy.npz'}")
    np.savez(tmp_path / "3d.npz", x=u8[0], y=np.array([0]))
    with pytest.raises(DataError, match="4-D"):
        load_dataset(f"npz:{tmp_path / '3d.npz'}")
    with pytest.raises(DataError, match="unknown dataset"):
        load_dataset("mnist")


def test_digits_split_is_fixed():
    pytest.importorskip("sklearn")
    test = load_dataset("digits", split="test")
    train = load_dataset("digits", split="train")
    assert len(test) == 360 and len(train) == 1437 and test.input_shape == (1, 8, 8)
    assert 0.0 <= test.images.min() and test.images.max() <= 1.0
    again = load_dataset("digits", split="test")
    np.testing.assert_array_equal(test.labels, again.labels)
