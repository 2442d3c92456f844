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


def test_vectorised_augment_equals_the_per_image_reference_for_a_seed():
    from dualrs_route.experts.training import augment_reference

    x = torch.rand(37, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    for seed in (0, 5, 123):
        fast = augment(x, torch.Generator().manual_seed(seed))
        slow = augment_reference(x, torch.Generator().manual_seed(seed))
        assert torch.equal(fast, slow), seed


def test_consistency_loss_matches_a_hand_computed_value():
    """Two copies of one image, two classes: copy softmaxes (0.5, 0.5) and (0.9, 0.1), label 0.

    CE = (ln 2 + ln(1/0.9)) / 2; pbar = (0.7, 0.3);
    KL(pbar || p1) = 0.7 ln(0.7/0.5) + 0.3 ln(0.3/0.5), KL(pbar || p2) = 0.7 ln(0.7/0.9) + 0.3 ln(0.3/0.1);
    H(pbar) = -(0.7 ln 0.7 + 0.3 ln 0.3).  loss = CE + lam * mean KL + eta * H.
    """
    import math

    from dualrs_route.experts.training import consistency_loss

    logits = torch.tensor([[0.0, 0.0], [math.log(9.0), 0.0]])  # copy-major: copy 0 then copy 1
    y = torch.tensor([0])
    ce = (math.log(2) + math.log(1 / 0.9)) / 2
    kl = ((0.7 * math.log(0.7 / 0.5) + 0.3 * math.log(0.3 / 0.5))
          + (0.7 * math.log(0.7 / 0.9) + 0.3 * math.log(0.3 / 0.1))) / 2
    h = -(0.7 * math.log(0.7) + 0.3 * math.log(0.3))
    got = float(consistency_loss(logits, y, copies=2, lam=10.0, eta=0.5))
    assert got == pytest.approx(ce + 10.0 * kl + 0.5 * h, rel=1e-6)
    assert float(consistency_loss(logits, y, copies=2, lam=0.0, eta=0.0)) == pytest.approx(ce, rel=1e-6)


def test_consistency_training_runs_resumes_and_records_its_recipe(tmp_path):
    out = train_expert(dataset="digits", data=None, sigma=0.5, arch="small_cnn", arch_args=TINY, epochs=1,
                       batch=64, lr=0.05, fraction=0.2, seed=3, threads=1, out=str(tmp_path / "cr"),
                       consistency=10.0, eta=0.5, copies=2, log=None)
    record = json.loads((out / "config.json").read_text())["training"]
    assert record["consistency"] == 10.0 and record["copies"] == 2 and "Jeong" in record["recipe"]
    with pytest.raises(Exception, match="copies"):
        train_expert(dataset="digits", data=None, sigma=0.5, epochs=1, out=str(tmp_path / "x"), consistency=1.0,
                     copies=1, log=None)
