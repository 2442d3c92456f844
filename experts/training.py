"""Expert training: f is trained on x + N(0, sigma^2 I), with fresh noise for every batch.

Two recipes:

* Gaussian data augmentation (Cohen et al. 2019): cross-entropy on one noisy copy;
* consistency regularisation (Jeong and Shin, NeurIPS 2020), ``consistency > 0``: m noisy
  copies of each image, cross-entropy on each, plus ``consistency`` times the mean KL from
  the copies' mean prediction to each copy, plus ``eta`` times the entropy of the mean
  (:func:`consistency_loss`).

``precision="bf16"`` runs forward and backward under ``torch.autocast("cpu", bfloat16)``
with fp32 master weights (the optimizer state stays fp32). The images are converted to a
float32 tensor once; crop, flip and noise are drawn per batch from one seeded generator.
 Checkpoints every epoch to ``OUT/checkpoint.pt``
(tensors only, loaded back with ``weights_only=True``); re-running the same command
resumes from it. The finished folder holds ``config.json`` (with a training record)
and ``model.safetensors``.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Callable

import numpy as np

from .data import CIFAR10_MEAN, CIFAR10_STD, load_dataset
from .errors import DataError
from .folders import ModelConfig, save_folder

CHECKPOINT = "checkpoint.pt"


def resume_checkpoint(path: Path, settings: dict, model, optimizer, scheduler, log) -> tuple[int, list]:
    """Load ``path`` (our own tensors-only checkpoint, ``weights_only=True``) into the model,
    optimizer and scheduler; return (epochs done, history). (0, []) when there is none.
    Refuses a checkpoint written with other settings."""
    import torch

    if not path.is_file():
        return 0, []
    corrupt = f"{path} is not a readable training checkpoint; delete it to train from the start"
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises RuntimeError, UnpicklingError, EOFError, ... for damaged files
        raise DataError(f"{corrupt} ({type(exc).__name__}: {' '.join(str(exc).split())[:200]})") from None
    if not isinstance(state, dict):
        raise DataError(corrupt)
    if state.get("settings") != settings:
        raise DataError(f"{path} was written with other settings ({state.get('settings')}); delete it or repeat them")
    try:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        epoch, history = int(state["epoch"]), list(state["history"])
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        raise DataError(f"{corrupt} ({type(exc).__name__}: {' '.join(str(exc).split())[:200]})") from None
    log(f"resuming from {path} at epoch {epoch}")
    return epoch, history


def default_architecture(input_shape) -> tuple[str, dict]:
    if tuple(input_shape) == (3, 32, 32):
        return "cifar_resnet20", {}
    return "small_cnn", {}


def channel_stats(dataset, indices) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of the given training images (CIFAR-10: the published constants)."""
    if dataset.name == "cifar10":
        return list(CIFAR10_MEAN), list(CIFAR10_STD)
    x = dataset.batch(indices)
    return ([round(float(v), 4) for v in x.mean(axis=(0, 2, 3))],
            [round(max(float(v), 1e-3), 4) for v in x.std(axis=(0, 2, 3))])


def augment_reference(batch, generator):
    """The per-image reference of :func:`augment` (same draws from ``generator``, a Python loop)."""
    import torch

    n, _, h, w = batch.shape
    padded = torch.nn.functional.pad(batch, (4, 4, 4, 4))
    dy = torch.randint(0, 9, (n,), generator=generator)
    dx = torch.randint(0, 9, (n,), generator=generator)
    flip = torch.rand(n, generator=generator) < 0.5
    out = torch.empty_like(batch)
    for i in range(n):
        crop = padded[i, :, int(dy[i]):int(dy[i]) + h, int(dx[i]):int(dx[i]) + w]
        out[i] = crop.flip(-1) if bool(flip[i]) else crop
    return out


def consistency_terms(logits):
    """Per image, from logits [M, B, K] of M noisy copies: (mean_m KL(pbar || p_m) [B], H(pbar) [B]),
    where pbar is the mean of the copies' softmax (computed stably in log space)."""
    import torch

    log_p = torch.log_softmax(logits, dim=-1)  # [M, B, K]
    log_pbar = torch.logsumexp(log_p, dim=0) - math.log(logits.shape[0])  # [B, K]
    pbar = log_pbar.exp()
    kl = (pbar.unsqueeze(0) * (log_pbar.unsqueeze(0) - log_p)).sum(-1).mean(0)  # [B]
    entropy = -(pbar * log_pbar).sum(-1)  # [B]
    return kl, entropy


def consistency_loss(logits, targets, copies: int, lam: float, eta: float):
    """Jeong and Shin's consistency-regularised loss over ``copies`` noisy copies.

    ``logits`` is [copies * B, classes], copy-major (rows j*B .. (j+1)*B - 1 are copy j);
    ``targets`` is [B]. Returns
    ``mean_j CE(logits_j, y) + lam * mean_j KL(p_mean || p_j) + eta * H(p_mean)``,
    each term averaged over the batch, where ``p_mean`` is the mean of the copies' softmax.
    """
    import torch.nn.functional as F

    logits = logits.float()
    chunks = logits.reshape(copies, -1, logits.shape[-1])  # [m, B, C]
    ce = F.cross_entropy(chunks.reshape(-1, chunks.shape[-1]), targets.repeat(copies))
    if lam == 0 and eta == 0:
        return ce
    kl, entropy = consistency_terms(chunks)
    return ce + lam * kl.mean() + eta * entropy.mean()


def bf16_supported() -> bool:
    """Whether this CPU runs bfloat16 natively (AVX-512 BF16 or AMX); elsewhere bf16 is emulated and slow."""
    try:
        flags = Path("/proc/cpuinfo").read_text().split("flags", 2)[1].split("\n", 1)[0].split()
    except (OSError, IndexError):
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def check_training_precision(precision: str) -> None:
    """Refuse a training precision other than fp32/bf16; warn where bf16 would run emulated."""
    if precision not in ("fp32", "bf16"):
        raise DataError(f"precision must be fp32 or bf16, got {precision!r}")
    if precision == "bf16" and not bf16_supported():
        import warnings

        warnings.warn("this CPU has no native bfloat16 (avx512_bf16 or amx_bf16 in /proc/cpuinfo): bf16 runs "
                      "emulated, about 12x slower than fp32 on an AVX2-only AMD EPYC (benchmarks/RESULTS.md)",
                      stacklevel=3)


def augment(batch, generator):
    """Random 4-pixel-padded crop and horizontal flip, for 32x32 RGB images (torch, per batch)."""
    import torch

    n, _, h, w = batch.shape
    padded = torch.nn.functional.pad(batch, (4, 4, 4, 4))
    dy = torch.randint(0, 9, (n,), generator=generator)
    dx = torch.randint(0, 9, (n,), generator=generator)
    rows = (dy[:, None] + torch.arange(h)[None, :])  # [n, h]
    cols = (dx[:, None] + torch.arange(w)[None, :])  # [n, w]
    out = padded[torch.arange(n)[:, None, None, None], torch.arange(batch.shape[1])[None, :, None, None],
                 rows[:, None, :, None], cols[:, None, None, :]]
    flip = torch.rand(n, generator=generator) < 0.5
    out[flip] = out[flip].flip(-1)
    return out


def training_subset(length: int, fraction: float, seed: int) -> np.ndarray:
    """A fixed random subset (sorted indices) of a training split."""
    if fraction >= 1.0:
        return np.arange(length)
    count = max(1, int(round(length * fraction)))
    return np.sort(np.random.default_rng(seed).permutation(length)[:count])


def noisy_accuracy(model, dataset, indices, sigma: float, seed: int, batch: int = 500) -> float:
    """Accuracy of the base classifier on one Gaussian-noised copy of each image."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    correct = 0
    model.eval()
    with torch.inference_mode():
        for s in range(0, len(indices), batch):
            part = indices[s:s + batch]
            x = torch.from_numpy(dataset.batch(part))
            x = x + sigma * torch.randn(x.shape, generator=gen)
            correct += int((model(x).argmax(1).numpy() == dataset.labels[part]).sum())
    return correct / max(len(indices), 1)


def train_expert(*, dataset: str, data: str | None, sigma: float, arch: str | None = None, arch_args: dict | None = None,
                 epochs: int = 30, batch: int = 128, lr: float = 0.1, weight_decay: float = 5e-4,
                 fraction: float = 1.0, seed: int = 0, threads: int | None = None, out: str, overwrite: bool = False,
                 precision: str = "fp32", consistency: float = 0.0, eta: float = 0.5, copies: int = 2,
                 command: str = "", log: Callable[[str], None] | None = print, kind: str = "expert") -> Path:
    """Train at noise level ``sigma`` and write an expert folder to ``out``.

    SGD with Nesterov momentum 0.9 and a one-cycle cosine learning-rate schedule.
    ``consistency = 0``: Gaussian augmentation (one noisy copy, cross-entropy).
    ``consistency > 0``: :func:`consistency_loss` over ``copies`` noisy copies with
    lambda = ``consistency`` and ``eta``. ``precision``: ``fp32`` or ``bf16`` (autocast, fp32
    master weights). Deterministic for a seed, thread count and precision; resumable from
    ``OUT/checkpoint.pt`` by running the same call again.
    """
    import torch

    from .architectures import build_model

    log = log or (lambda message: None)
    check_training_precision(precision)
    if consistency < 0 or eta < 0 or not math.isfinite(consistency) or not math.isfinite(eta):
        raise DataError(f"consistency and eta must be finite and >= 0, got {consistency} and {eta}")
    if copies < 1 or (consistency > 0 and copies < 2):
        raise DataError(f"consistency training needs copies >= 2, got {copies}")
    copies = copies if consistency > 0 else 1
    out_dir = Path(out)
    if (out_dir / "config.json").exists() and not overwrite:
        raise FileExistsError(f"{out_dir} already holds a model; pass --force to replace it")
    if threads:
        torch.set_num_threads(threads)
    train = load_dataset(dataset, split="train", data=data)
    test = load_dataset(dataset, split="test", data=data)
    subset = training_subset(len(train), fraction, seed)
    if len(subset) < batch:
        batch = len(subset)
    name, default_args = default_architecture(train.input_shape)
    arch = arch or name
    arch_args = dict(default_args if arch == name else {}, **(arch_args or {}))
    mean, std = channel_stats(train, subset)
    num_classes = int(train.labels.max()) + 1
    torch.manual_seed(seed)
    model = build_model(arch, num_classes=num_classes, input_shape=train.input_shape, mean=mean, std=std, **arch_args)
    steps_per_epoch = math.ceil(len(subset) / batch)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=weight_decay)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=epochs * steps_per_epoch,
                                                    pct_start=0.15, anneal_strategy="cos")
    settings = {"dataset": dataset, "sigma": sigma, "arch": arch, "arch_args": arch_args, "epochs": epochs,
                "batch": batch, "lr": lr, "weight_decay": weight_decay, "fraction": fraction, "seed": seed,
                "precision": precision, "consistency": consistency, "eta": eta if consistency > 0 else 0.0,
                "copies": copies}
    ckpt_path = out_dir / CHECKPOINT
    start_epoch, history = resume_checkpoint(ckpt_path, settings, model, optimizer, scheduler, log)
    out_dir.mkdir(parents=True, exist_ok=True)
    augment_images = tuple(train.input_shape) == (3, 32, 32)
    # Convert once: the loop then only gathers rows of a float32 tensor.
    images = torch.from_numpy(train.batch(subset))
    labels = torch.from_numpy(train.labels[subset])
    lam, ent = (consistency, eta) if consistency > 0 else (0.0, 0.0)
    model = model.to(memory_format=torch.channels_last)
    for epoch in range(start_epoch, epochs):
        gen = torch.Generator().manual_seed(seed * 1000 + epoch)
        order = torch.from_numpy(np.random.default_rng(seed * 1000 + epoch).permutation(len(subset)))
        model.train()
        started, total_loss, correct = time.perf_counter(), 0.0, 0
        for step in range(steps_per_epoch):
            part = order[step * batch:(step + 1) * batch]
            x, y = images[part], labels[part]
            if augment_images:
                x = augment(x, gen)
            if copies > 1:
                x = x.repeat(copies, 1, 1, 1)
            x = (x + sigma * torch.randn(x.shape, generator=gen)).contiguous(memory_format=torch.channels_last)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
                logits = model(x)
            loss = consistency_loss(logits, y, copies, lam, ent)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            total_loss += float(loss.detach()) * len(part)
            correct += int((logits[:len(part)].argmax(1) == y).sum())
        record = {"epoch": epoch + 1, "loss": round(total_loss / len(subset), 4),
                  "noisy_train_accuracy": round(correct / len(subset), 4),
                  "seconds": round(time.perf_counter() - started, 1), "threads": torch.get_num_threads()}
        history.append(record)
        log(f"epoch {epoch + 1}/{epochs}: loss {record['loss']:.4f}, noisy train acc "
            f"{100 * record['noisy_train_accuracy']:.1f}%, {record['seconds']:.0f}s")
        save_checkpoint(ckpt_path, {"settings": settings, "model": model.state_dict(),
                                    "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                                    "epoch": epoch + 1, "history": history})
    model = model.to(memory_format=torch.contiguous_format)
    test_indices = np.arange(min(len(test), 2000))
    accuracy = noisy_accuracy(model, test, test_indices, sigma, seed)
    log(f"noisy test accuracy (sigma={sigma}, {len(test_indices)} images): {100 * accuracy:.1f}%")
    recipe = ("Gaussian data augmentation (Cohen et al. 2019)" if consistency == 0 else
              f"consistency regularisation (Jeong and Shin 2020), lambda={consistency}, eta={eta}, m={copies}")
    config = ModelConfig(
        kind=kind, sigma=float(sigma), num_classes=num_classes, input_shape=tuple(train.input_shape), mean=tuple(mean),
        std=tuple(std), architecture=arch, architecture_args=arch_args, class_names=train.class_names,
        name=out_dir.name,
        extra={"training": {"command": command, "recipe": recipe,
                            **settings, "train_images": int(len(subset)), "history": history,
                            "noisy_test_accuracy": round(accuracy, 4), "noisy_test_images": int(len(test_indices))}},
    )
    save_folder(out_dir, config, model, overwrite=True)
    ckpt_path.unlink(missing_ok=True)
    return out_dir


def save_checkpoint(path: Path, state: dict) -> None:
    """Write ``state`` with torch.save atomically (:func:`~dualrs_route.experts.atomic.atomic_write`)."""
    import torch

    from .atomic import atomic_write

    with atomic_write(path) as handle:
        torch.save(state, handle)
