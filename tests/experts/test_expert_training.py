"""Gaussian-augmentation expert training: output folder, determinism and resume."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

pytest.importorskip("sklearn")

from dualrs_route.experts.folders import load_folder
from dualrs_route.export.engines import make_counter  # noqa: E402
from dualrs_route.experts.training import augment, train_expert  # noqa: E402

TINY = {"channels": [4], "hidden": 8}


def _train(out, log=None, epochs=2):
    return train_expert(dataset="digits", data=None, sigma=0.5, arch="small_cnn", arch_args=TINY, epochs=epochs,
                        batch=64, lr=0.05, fraction=0.2, seed=3, threads=1, out=str(out), log=log)


def _weights(folder):
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


def test_writes_a_loadable_expert_folder(tmp_path):
    out = _train(tmp_path / "e")
    folder = load_folder(str(out), expected_kind="expert")
    cfg = folder.config
    assert cfg.sigma == 0.5 and cfg.num_classes == 10 and cfg.input_shape == (1, 8, 8)
    record = json.loads((out / "config.json").read_text())["training"]
    assert record["epochs"] == 2 and len(record["history"]) == 2 and record["train_images"] == 287
    assert not (out / "checkpoint.pt").exists()
    counter = make_counter(folder)
    assert counter.num_classes == 10


def test_same_seed_same_weights_and_resume_matches(tmp_path):
    first = _weights(_train(tmp_path / "a"))
    again = _weights(_train(tmp_path / "b"))
    for key in first:
        assert torch.equal(first[key], again[key]), key

    class Killed(Exception):
        pass

    def die_in_epoch_two(message):
        if message.startswith("epoch 2/2"):  # epoch 1 is checkpointed, epoch 2 is not
            raise Killed

    with pytest.raises(Killed):
        _train(tmp_path / "c", log=die_in_epoch_two)
    assert (tmp_path / "c" / "checkpoint.pt").is_file()
    assert not (tmp_path / "c" / "config.json").exists()
    resumed = _weights(_train(tmp_path / "c"))
    for key in first:
        assert torch.allclose(first[key], resumed[key], atol=1e-6), key


def test_existing_model_is_not_overwritten(tmp_path):
    _train(tmp_path / "a", epochs=1)
    with pytest.raises(FileExistsError):
        _train(tmp_path / "a", epochs=1)


def test_augment_is_a_crop_and_flip_of_the_padded_image():
    x = torch.arange(2 * 3 * 32 * 32, dtype=torch.float32).reshape(2, 3, 32, 32)
    out = augment(x, torch.Generator().manual_seed(0))
    assert out.shape == x.shape
    padded = torch.nn.functional.pad(x, (4, 4, 4, 4))
    for i in range(2):
        found = False
        for dy in range(9):
            for dx in range(9):
                crop = padded[i, :, dy:dy + 32, dx:dx + 32]
                if torch.equal(out[i], crop) or torch.equal(out[i], crop.flip(-1)):
                    found = True
        assert found
    assert not np.array_equal(out.numpy(), x.numpy())
