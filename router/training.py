"""Training a Dual RS router from a labels file (Sun, Mao and Vechev, ICLR 2026, routing form).

Inputs: a labels file (:mod:`router.labels`: radii R [n, K] of K experts on n images) and
the same K experts. Images whose radius is 0 for every expert are dropped. For each kept
image x with radii R (pixel units):

* soft labels  y_k = exp(R_k / T) / sum_j exp(R_j / T)               (:func:`soft_labels`)
  T = 1 (the default) is the paper's rule; a smaller T sharpens the labels, which matters
  when the radii are small (pixel units) and so differ little.
* best expert  b = argmax_k R_k (ties: lowest k); q_k = share of kept images with b = k;
  class-balance weight w(x) = 1 / q_b (the paper's rule, the default), or 1 for every
  image with ``balance=False``                                         (:func:`class_weights`)
* M = 2 Gaussian copies x + delta_m, delta_m ~ N(0, sigma_e^2 I), fresh every step; router
  softmax p_m = softmax(f(x + delta_m)); mean prediction pbar = (1/M) sum_m p_m.
* per-image loss (:func:`router_loss`)

      w(x) * [ (1/M) sum_m CE(y, p_m)                         (soft-label cross-entropy, each copy)
              + lambda * (1/M) sum_m KL(pbar || p_m)          (consistency, Jeong and Shin 2020)
              + eta * H(pbar) ]                               (entropy of the mean prediction)

  with CE(y, p) = -sum_k y_k log p_k, KL(a || b) = sum_k a_k (log a_k - log b_k) and
  H(a) = -sum_k a_k log a_k (natural logs). The batch loss is the plain mean of the
  per-image losses (so it is on average ~K_present times an unweighted loss; Adam does
  not care). The consistency weight w_r of the paper is 1 here.

Optimiser: AdamW(lr, weight_decay); the learning rate is halved after 1/3 and after 2/3
of the epochs (the paper: every 30 of 90 epochs). 32x32 RGB inputs also get the random
crop + flip of :func:`experts.training.augment` (before the noise).

Deterministic for (seed, thread count). Checkpoints every epoch to ``OUT/checkpoint.pt``
(tensors and plain containers only, read back with ``weights_only=True``); re-running
the same command resumes. The output is a router folder: ``config.json`` (kind
"router", sigma = sigma_e, the experts as references - local ones relative to the
router folder - and a ``training`` record) plus ``model.safetensors``.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
import warnings
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from dualrs_route.experts.errors import DataError, IncompatibleModelsError
from dualrs_route.experts.folders import BUILTIN_PREFIX, HUB_PREFIX, ModelConfig, ModelFolder, load_folder, save_folder
from dualrs_route.experts.stats import check_sigma
from dualrs_route.experts.training import consistency_terms, resume_checkpoint, save_checkpoint

from .labels import LabelSet, best_expert, label_summary, load_labels, merge_labels, routable, weights_hash

CHECKPOINT = "checkpoint.pt"
DEFAULT_LAMBDA = 40.0
DEFAULT_ETA = 0.5
COPIES = 2


# --- the loss, as small pure functions (torch tensors in, tensors out) ---


def soft_labels(radii, temperature: float = 1.0):
    """float [B, K] -> float [B, K]: y_k = exp(R_k / T) / sum_j exp(R_j / T) per row (a softmax over radii).

    T = 1 is the paper's rule. Radii are in pixel units, so their spread depends on the
    data's scale; a smaller T sharpens the labels (T -> 0: one-hot on the best expert).
    """
    import torch

    if not (temperature > 0) or not math.isfinite(temperature):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature}")
    radii = torch.as_tensor(radii, dtype=torch.float32)
    return torch.softmax(radii / temperature, dim=1)


def class_weights(best, num_experts: int):
    """Class-balance weights of images from their best experts.

    ``best`` int [n] in [0, K). Returns ``(per_image float32 [n], per_expert float32 [K])``
    with per_expert[k] = 1 / q_k, q_k = mean(best == k); experts that are never best get
    weight 0 (no image uses it).
    """
    best = np.asarray(best, dtype=np.int64)
    if best.ndim != 1 or len(best) == 0:
        raise ValueError(f"best must be a non-empty int array [n], got shape {best.shape}")
    if best.min() < 0 or best.max() >= num_experts:
        raise ValueError(f"best experts must lie in [0, {num_experts}), got [{best.min()}, {best.max()}]")
    share = np.bincount(best, minlength=num_experts).astype(np.float64) / len(best)
    per_expert = np.where(share > 0, 1.0 / np.where(share > 0, share, 1.0), 0.0)
    return per_expert[best].astype(np.float32), per_expert.astype(np.float32)


def consistency_loss(logits, lam: float = DEFAULT_LAMBDA, eta: float = DEFAULT_ETA):
    """float [B]: lambda * mean_m KL(pbar || p_m) + eta * H(pbar) for logits [M, B, K]."""
    kl, entropy = consistency_terms(logits)
    return lam * kl + eta * entropy


def regret_weights(radii) -> np.ndarray:
    """float32 [n]: each image's largest regret max_k R_k - min_k R_k (the radius lost by the worst choice),
    divided by its mean over the images: routing matters little where the experts tie and much where one
    certifies far beyond another (sigma 1.0 at 3.0 against 0.8), which the plain loss weighs alike."""
    radii = np.asarray(radii, dtype=np.float64)
    spread = radii.max(axis=1) - radii.min(axis=1)
    if radii.ndim != 2 or not (spread.mean() > 0):
        raise ValueError("regret weights need label radii [n, K] that differ somewhere")
    return (spread / spread.mean()).astype(np.float32)


def soft_cross_entropy(logits, targets):
    """float [B]: mean over the M copies of -sum_k y_k log p_{m,k}; logits [M, B, K], targets [B, K]."""
    import torch

    return -(targets.unsqueeze(0) * torch.log_softmax(logits, dim=-1)).sum(-1).mean(0)


def router_loss(logits, targets, weights, lam: float = DEFAULT_LAMBDA, eta: float = DEFAULT_ETA):
    """Batch loss: mean_i w_i * [CE_i + lambda * KL_i + eta * H_i] (see the module docstring).

    ``logits`` [M, B, K], ``targets`` soft labels [B, K], ``weights`` [B]. Returns
    ``(loss scalar, parts)`` where parts holds the unweighted batch means of
    ``ce``, ``kl`` and ``entropy`` (detached floats).
    """
    if logits.ndim != 3 or targets.shape != logits.shape[1:] or weights.shape != logits.shape[1:2]:
        raise ValueError(f"need logits [M, B, K], targets [B, K], weights [B]; got {list(logits.shape)}, "
                         f"{list(targets.shape)}, {list(weights.shape)}")
    ce = soft_cross_entropy(logits, targets)
    kl, entropy = consistency_terms(logits)
    per_image = weights * (ce + lam * kl + eta * entropy)
    parts = {"ce": float(ce.detach().mean()), "kl": float(kl.detach().mean()),
             "entropy": float(entropy.detach().mean())}
    return per_image.mean(), parts


def lr_milestones(epochs: int) -> list[int]:
    """Epochs after which the learning rate is halved: 1/3 and 2/3 of the run (30, 60 of 90)."""
    return sorted({m for m in (round(epochs / 3), round(2 * epochs / 3)) if 0 < m < epochs})


# --- references ---


def portable_reference(folder: ModelFolder, router_dir: Path) -> str:
    """How the router's config names an expert: hf:// and builtin: as given, local folders
    as a path relative to the router folder (so both can move together)."""
    ref = folder.reference
    if ref.startswith(HUB_PREFIX) or ref.startswith(BUILTIN_PREFIX):
        return ref
    return os.path.relpath(folder.path.resolve(), router_dir.resolve())


def match_experts(labels: LabelSet, experts: Sequence[ModelFolder], source: str = "the labels file") -> None:
    """Raise IncompatibleModelsError unless ``experts`` are the labels file's experts, in order
    (same weight file sha256 and same sigma)."""
    if len(experts) != labels.num_experts:
        raise IncompatibleModelsError(f"{source} has {labels.num_experts} experts ({', '.join(labels.references)}) but "
                                      f"{len(experts)} --expert options were given; pass the same experts in order")
    for k, (folder, digest, ref, sigma) in enumerate(zip(experts, labels.sha256, labels.references, labels.sigmas)):
        if weights_hash(folder) != digest or folder.config.sigma != float(sigma):
            raise IncompatibleModelsError(f"expert {k} ({folder.reference}, sigma {folder.config.sigma}) is not the "
                                          f"smoothed classifier {source} was made with ({ref}, sigma {float(sigma)}, "
                                          f"sha256 {digest[:12]}...); pass the labels' experts in the same order")


def default_router_architecture(input_shape) -> tuple[str, dict]:
    """small_cnn; channels (32, 64, 128) for 32x32 inputs, the registry's defaults otherwise."""
    if tuple(input_shape)[1:] == (32, 32):
        return "small_cnn", {"channels": [32, 64, 128], "hidden": 128}
    return "small_cnn", {}


def _dataset_of(labels: LabelSet, data: str | None):
    from dualrs_route.experts.data import load_dataset

    settings = labels.meta.get("settings", {})
    return load_dataset(settings.get("dataset", ""), split=settings.get("split", "train"),
                        data=data if data is not None else settings.get("data"))


def _check_images_match(labels: LabelSet, dataset, source: str) -> None:
    if len(labels.indices) and labels.indices.max() >= len(dataset):
        raise DataError(f"{source} refers to image {labels.indices.max()} but {dataset.name}/{dataset.split} has "
                        f"{len(dataset)} images; is --data the same data set?")
    if not np.array_equal(dataset.labels[labels.indices], labels.labels):
        raise DataError(f"{source}: the data set's labels differ from the ones recorded in the labels file; "
                        "is --data the same data set in the same order?")


# --- training ---


def train_router(*, labels: str | Sequence[str], experts: Sequence[str], out: str, arch: str | None = None,
                 arch_args: dict | None = None, init: str | None = None,
                 sigma_e: float | None = None, epochs: int = 90, batch: int = 256, lr: float = 0.01,
                 weight_decay: float = 0.01, lam: float = DEFAULT_LAMBDA, eta: float = DEFAULT_ETA,
                 temperature: float = 1.0, balance: bool = True, seed: int = 0, data: str | None = None,
                 augment: bool | None = None, threads: int | None = None,
                 holdout: str | None = None, report_n: int = 100, overwrite: bool = False, command: str = "",
                 device: str = "cpu", precision: str = "fp32", regret: bool = False,
                 log: Callable[[str], None] | None = print) -> Path:
    """Train a router on ``labels`` for ``experts`` and write the router folder ``out``.

    ``regret``: multiply each image's weight by :func:`regret_weights` (its radius spread over the experts).

    ``labels`` is one labels file or several of disjoint images (merged by
    :func:`router.labels.merge_labels`). ``init`` (a model folder reference) starts the
    router from that model's weights (:func:`init_from_folder`: all but the final layer for
    the same architecture, the whole model as ``base`` of a ``confidence_head``); the
    architecture defaults to the init model's.

    ``sigma_e`` defaults to the largest expert sigma (the paper's heuristic). Any sigma_e gives a
    valid certificate; a smaller one gets a warning that states the cap it puts on every radius
    (:func:`router.dual.sigma_e_note`). With ``holdout`` (a labels file of other
    images, same experts) the finished router is evaluated with :func:`routing_report` and
    the report is stored in the training record. ``device`` (``cpu``, ``cuda[:N]``) runs the
    network and draws the training noise there; crops and flips stay on the host generator.
    A GPU run draws different noise than a CPU run with the same seed (recorded as
    ``device_type``). ``precision="bf16"`` (CPU only) runs the forward and backward passes under
    ``torch.autocast("cpu", bfloat16)`` with fp32 master weights and an fp32 loss, as
    ``train-expert --precision bf16`` does. Returns the folder path.
    """
    import torch

    from dualrs_route.experts.architectures import build_model
    from dualrs_route.experts.engine import resolve_device
    from dualrs_route.experts.training import augment as augment_batch
    from dualrs_route.experts.training import check_training_precision

    from .dual import check_expert_set, load_router_set, sigma_e_note

    log = log or (lambda message: None)
    out_dir = Path(out)
    if (out_dir / "config.json").exists() and not overwrite:
        raise FileExistsError(f"{out_dir} already holds a model; pass --force to replace it")
    for name, value in (("--epochs", epochs), ("--batch", batch)):
        if isinstance(value, bool) or int(value) != value or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    for name, value in (("--lr", lr), ("--lambda", lam), ("--eta", eta), ("--weight-decay", weight_decay)):
        if not math.isfinite(value) or value < 0 or (name == "--lr" and value == 0):
            raise ValueError(f"{name} must be a finite number {'> 0' if name == '--lr' else '>= 0'}, got {value}")
    if seed < 0:
        raise ValueError(f"--seed must be >= 0, got {seed}")
    dev = resolve_device(device)
    check_training_precision(precision)
    if precision != "fp32" and dev.type != "cpu":
        raise ValueError(f"--precision {precision} is for CPU training; train on {dev.type} in fp32")
    label_files = [str(labels)] if isinstance(labels, (str, os.PathLike)) else [str(f) for f in labels]
    if not label_files:
        raise ValueError("no labels file given")
    label_set = merge_labels([load_labels(f, require_complete=True) for f in label_files], label_files)
    init_folder = load_folder(init) if init else None
    folders = [load_folder(ref, expected_kind="expert") for ref in experts]
    check_expert_set(folders)
    match_experts(label_set, folders)
    holdout_set = load_labels(holdout, require_complete=True) if holdout else None
    if holdout_set is not None:
        match_experts(holdout_set, folders, "the --holdout labels file")
    largest = max(f.config.sigma for f in folders)
    sigma_e = largest if sigma_e is None else check_sigma(sigma_e, "--sigma-e")
    note = sigma_e_note(sigma_e, largest)
    if note:
        warnings.warn(note, stacklevel=2)
    if threads:
        torch.set_num_threads(threads)
    dataset = _dataset_of(label_set, data)
    _check_images_match(label_set, dataset, ", ".join(label_files))
    cfg0 = folders[0].config
    if tuple(dataset.input_shape) != tuple(cfg0.input_shape):
        raise DataError(f"images have shape {list(dataset.input_shape)} but the experts take {list(cfg0.input_shape)}")

    keep = routable(label_set.radii)
    if not keep.any():
        raise DataError(f"{labels}: every image has radius 0 for every expert; nothing to learn from")
    images = label_set.indices[keep]
    radii = label_set.radii[keep]
    best = best_expert(radii)
    weights, per_expert = class_weights(best, len(folders))
    if not balance:
        weights, per_expert = np.ones_like(weights), np.ones_like(per_expert)
    if regret:
        weights = weights * regret_weights(radii)
    targets = soft_labels(radii, temperature)
    k_experts = len(folders)
    log(f"{len(images)} of {len(label_set.indices)} images routable; best-expert shares "
        + ", ".join(f"{f.name} {100 * float(np.mean(best == k)):.1f}%" for k, f in enumerate(folders)))

    default_name, default_args = default_router_architecture(cfg0.input_shape)
    if init_folder is not None and arch is None:
        default_name, default_args = init_folder.config.architecture, dict(init_folder.config.architecture_args)
    arch = arch or default_name
    arch_args = dict(default_args if arch == default_name else {}, **(arch_args or {}))
    batch = min(int(batch), len(images))
    augment = tuple(cfg0.input_shape) == (3, 32, 32) if augment is None else bool(augment)
    settings = {"labels_sha256": _file_sha256(label_files[0]) if len(label_files) == 1 else
                [_file_sha256(f) for f in label_files], "experts": [[weights_hash(f), f.config.sigma] for f in folders],
                "arch": arch, "arch_args": arch_args, "sigma_e": float(sigma_e), "epochs": int(epochs),
                "batch": int(batch), "lr": float(lr), "weight_decay": float(weight_decay), "lambda": float(lam),
                "eta": float(eta), "temperature": float(temperature), "class_balance": bool(balance), "seed": int(seed),
                "augment": augment, "copies": COPIES}
    if init_folder is not None:
        settings["init"] = {"reference": init_folder.reference, "sha256": weights_hash(init_folder)}
    if dev.type != "cpu":  # a different noise stream: resuming across device types would mix two runs
        settings["device_type"] = dev.type
    if precision != "fp32":  # fp32 runs keep the settings (and checkpoints) of earlier versions
        settings["precision"] = precision
    if regret:  # likewise: only set where used
        settings["regret_weights"] = True
    torch.manual_seed(seed)
    try:
        model = build_model(arch, num_classes=k_experts, input_shape=cfg0.input_shape, mean=cfg0.mean, std=cfg0.std,
                            **arch_args)
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"cannot build router architecture {arch!r} with {arch_args}: {exc}") from None
    if init_folder is not None:
        fresh = init_from_folder(model, init_folder)
        log(f"initialised from {init_folder.reference}; new (random) tensors: {', '.join(fresh) or 'none'}")
    model = model.to(dev)
    if precision == "bf16":
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=lr_milestones(epochs), gamma=0.5)
    ckpt_path = out_dir / CHECKPOINT
    start_epoch, history = resume_checkpoint(ckpt_path, settings, model, optimizer, scheduler, log)
    out_dir.mkdir(parents=True, exist_ok=True)
    steps = math.ceil(len(images) / batch)
    weights_t = torch.from_numpy(weights).to(dev)
    targets = targets.to(dev)
    for epoch in range(start_epoch, epochs):
        gen = torch.Generator().manual_seed(seed * 1000 + epoch)
        noise_gen = gen if dev.type == "cpu" else torch.Generator(device=dev).manual_seed(seed * 1000 + epoch)
        order = np.random.default_rng(seed * 1000 + epoch).permutation(len(images))
        model.train()
        started = time.perf_counter()
        sums = {"loss": 0.0, "ce": 0.0, "kl": 0.0, "entropy": 0.0}
        agree = 0
        for step in range(steps):
            rows = order[step * batch:(step + 1) * batch]
            x = torch.from_numpy(dataset.batch(images[rows]))
            if augment:
                x = augment_batch(x, gen)
            x = x.to(dev)
            noisy = x.unsqueeze(0) + sigma_e * torch.randn((COPIES, *x.shape), generator=noise_gen, device=dev)
            noisy = noisy.reshape(-1, *x.shape[1:])
            if precision == "bf16":
                noisy = noisy.contiguous(memory_format=torch.channels_last)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
                logits = model(noisy)
            logits = logits.float().reshape(COPIES, len(rows), k_experts)
            picked = torch.from_numpy(rows).to(dev)
            loss, parts = router_loss(logits, targets[picked], weights_t[picked], lam, eta)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            sums["loss"] += float(loss.detach()) * len(rows)
            for key, value in parts.items():
                sums[key] += value * len(rows)
            agree += int((logits.detach().mean(0).argmax(1).cpu().numpy() == best[rows]).sum())
        scheduler.step()
        record = {"epoch": epoch + 1, **{k: round(v / len(images), 4) for k, v in sums.items()},
                  "noisy_best_expert_accuracy": round(agree / len(images), 4),
                  "lr": optimizer.param_groups[0]["lr"], "seconds": round(time.perf_counter() - started, 1)}
        history.append(record)
        log(f"epoch {epoch + 1}/{epochs}: loss {record['loss']:.4f} (ce {record['ce']:.3f}, kl {record['kl']:.4f}, "
            f"H {record['entropy']:.3f}), best-expert acc {100 * record['noisy_best_expert_accuracy']:.1f}%, "
            f"{record['seconds']:.0f}s")
        save_checkpoint(ckpt_path, {"settings": settings, "model": model.state_dict(),
                                    "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                                    "epoch": epoch + 1, "history": history})
    model = model.eval().cpu().to(memory_format=torch.contiguous_format)
    record = {
        "command": command,
        "recipe": "Dual RS router (Sun, Mao and Vechev 2026): softmax-of-radii soft labels, 1/q_k class weights, "
                  "consistency loss (Jeong and Shin 2020) over 2 Gaussian copies at sigma_e; AdamW, lr halved at 1/3 "
                  "and 2/3 of the epochs",
        "labels": {"file": label_files[0] if len(label_files) == 1 else label_files,
                   "sha256": settings["labels_sha256"], **label_summary(label_set),
                   "settings": {k: label_set.meta.get("settings", {}).get(k)
                                for k in ("dataset", "split", "selection", "images", "N0", "N", "alpha", "seed")}},
        **{k: v for k, v in settings.items() if k not in ("labels_sha256", "experts")},
        "class_weights": {f.name: round(float(w), 4) for f, w in zip(folders, per_expert)},
        "train_images": int(len(images)), "final": history[-1] if history else {}, "history": history,
    }
    refs = [portable_reference(f, out_dir) for f in folders]
    config = ModelConfig(kind="router", sigma=float(sigma_e), num_classes=k_experts,
                         input_shape=tuple(cfg0.input_shape),
                         mean=tuple(cfg0.mean), std=tuple(cfg0.std), architecture=arch, architecture_args=arch_args,
                         class_names=tuple(f.name for f in folders), experts=tuple(refs), name=out_dir.name,
                         extra={"training": record})
    save_folder(out_dir, config, model, overwrite=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        load_router_set(str(out_dir))  # the folder must load with its experts, from where it lies
    if holdout_set is not None:
        report = routing_report_for_folder(str(out_dir), holdout_set, n=report_n, seed=seed, data=data, device=device)
        record["holdout_report"] = report
        log(format_report(report))
        config = dataclasses.replace(config, extra={"training": record})
        save_folder(out_dir, config, None, overwrite=True)
    ckpt_path.unlink(missing_ok=True)
    return out_dir


def init_from_folder(model, folder: ModelFolder) -> list[str]:
    """Copy ``folder``'s weights into ``model`` wherever name and shape agree; return the names left fresh.

    Meant for starting a router from an expert: with the same architecture only the final
    layer (K router classes vs the expert's classes) stays random; with
    ``confidence_head`` the expert's network becomes ``base.*`` (every tensor copied) and
    only ``head.*`` is new. Any other difference - a source tensor with no place in the
    router, or more than one layer of mismatched shapes - is an IncompatibleModelsError, as
    is a folder without torch weights.
    """
    source = folder.load_torch_model().state_dict()
    target = model.state_dict()
    mapping = {}
    for name in target:
        for candidate in (name, name.replace(".base.", ".", 1)):
            if candidate in source:
                mapping[name] = candidate
                break
    unused = sorted(set(source) - set(mapping.values()))
    reshaped = [t for t, s in mapping.items() if source[s].shape != target[t].shape]
    if unused or len(reshaped) > 2 or len(reshaped) == len(mapping):
        raise IncompatibleModelsError(
            f"--init {folder.reference}: architecture {folder.config.architecture!r} "
            f"{folder.config.architecture_args} does not match the router's (differing tensors: "
            f"{(unused + reshaped)[:6]}); pass the same --arch/--arch-args or none")
    model.load_state_dict({t: (source[mapping[t]] if t in mapping and t not in reshaped else value)
                           for t, value in target.items()})
    return reshaped + [t for t in target if t not in mapping]


def _file_sha256(path) -> str:
    from dualrs_route.experts.folders import sha256_file

    return sha256_file(Path(path))


# --- diagnostics ---


def quantiles(values, qs=(0.1, 0.25, 0.5, 0.75, 0.9, 0.95, 0.99)) -> dict:
    """Quantiles, interpolated; with infinite values (a router set that holds every expert has R_sigma = inf)
    the sample quantile itself (``inverted_cdf``), since interpolating between infinities gives nan."""
    values = np.asarray(values, dtype=np.float64)
    if len(values) == 0:
        return {}
    method = "linear" if np.isfinite(values).all() else "inverted_cdf"
    return {f"q{round(100 * q):02d}": round(float(np.quantile(values, q, method=method)), 4) for q in qs}


def routing_diagnostics(radii, choices) -> dict:
    """The radius lost to routing, from label radii [n, K] and the router's choices [n].

    R*(x) = max_k R_k(x) and R_routed(x) = R_choice(x) are radii at the labels' budget;
    dR = R* - R_routed >= 0. Reports over the images with R* > 0 (the others cannot lose):
    routing accuracy (the choice attains R*, so ties count as right), agreement with
    argmax (lowest-index best), mean radii, dR quantiles, and the ECDF of dR at a few points.
    """
    radii = np.asarray(radii, dtype=np.float64)
    choices = np.asarray(choices, dtype=np.int64)
    if radii.ndim != 2 or choices.shape != radii.shape[:1]:
        raise ValueError(f"need radii [n, K] and choices [n], got {radii.shape} and {choices.shape}")
    valid = (choices >= 0) & (choices < radii.shape[1])
    best = radii.max(axis=1)
    routed = np.where(valid, radii[np.arange(len(radii)), np.clip(choices, 0, radii.shape[1] - 1)], 0.0)
    loss = best - routed
    keep = best > 0
    out = {"images": int(len(radii)), "routable": int(keep.sum()),
           "router_abstained": int((~valid).sum())}
    if keep.any():
        d = loss[keep]
        out.update({
            "routing_accuracy": round(float(np.mean(routed[keep] >= best[keep])), 4),
            "argmax_agreement": round(float(np.mean(choices[keep] == np.argmax(radii[keep], axis=1))), 4),
            "mean_best_radius": round(float(best[keep].mean()), 4),
            "mean_routed_radius": round(float(routed[keep].mean()), 4),
            "delta_r_mean": round(float(d.mean()), 4),
            "delta_r_quantiles": quantiles(d),
            "delta_r_ecdf": {f"{t:g}": round(float(np.mean(d <= t)), 4) for t in (0.0, 0.05, 0.1, 0.25, 0.5, 1.0)},
            "chosen_share": {str(k): round(float(np.mean(choices[keep] == k)), 4) for k in range(radii.shape[1])},
        })
    return out


def router_choices(counter, sigma_e: float, dataset, indices, *, n: int = 100, seed: int = 0,
                   chunk: int = 256) -> np.ndarray:
    """The smoothed router's most frequent expert on ``n`` noisy copies of each image (int64 [len(indices)]).

    Uses the ROUTER_PREDICT noise streams of ``seed``; no abstention (a diagnostic, not a certificate).
    """
    from dualrs_route.experts.noise import NoiseKey, Stage

    out = []
    for start in range(0, len(indices), chunk):
        idx = np.asarray(indices[start:start + chunk])
        keys = [NoiseKey(int(seed), int(i), Stage.ROUTER_PREDICT) for i in idx]
        counts = counter.counts_many(dataset.batch(idx), sigma_e, n, keys=keys)
        out.append(np.argmax(counts, axis=1))
    return np.concatenate(out).astype(np.int64) if out else np.zeros(0, np.int64)


def routing_report_for_folder(router: str, holdout: LabelSet, *, n: int = 100, seed: int = 0, data: str | None = None,
                              device: str = "cpu", batch: int = 400) -> dict:
    """:func:`routing_diagnostics` of a router folder on a held-out labels file (same experts)."""
    from dualrs_route.export.engines import make_counter

    from .dual import load_router_set

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        router_folder, expert_folders = load_router_set(router)
    match_experts(holdout, expert_folders, "the held-out labels file")
    dataset = _dataset_of(holdout, data)
    _check_images_match(holdout, dataset, "the held-out labels file")
    counter = make_counter(router_folder, device=device, batch_size=batch)
    choices = router_choices(counter, router_folder.config.sigma, dataset, holdout.indices, n=n, seed=seed)
    report = routing_diagnostics(holdout.radii, choices)
    settings = holdout.meta.get("settings", {})
    report["holdout"] = {"dataset": settings.get("dataset"), "split": settings.get("split"),
                         "N": settings.get("N"), "router_samples": n}
    return report


def bottleneck_report(path: str) -> dict:
    """How often the router is the bottleneck, from a dual ``certify`` results TSV.

    Over rows where both stages certified (radius_router and radius_expert are numbers and
    the result did not abstain): the share with R_sigma < R_c, and quantiles of
    dR_sigma = R_sigma - R_c (negative: the router capped the radius). Also the router's
    and the expert stage's abstain counts.
    """
    from .results import read_results

    table = read_results(path)
    lines = Path(path).read_text().splitlines()
    header = lines[0].split("\t")
    if "radius_router" not in header or "radius_expert" not in header:
        raise DataError(f"{path}: no radius_router/radius_expert columns; pass a results TSV of `certify --router`")
    pos_r, pos_c = header.index("radius_router"), header.index("radius_expert")
    r_sigma, r_c = [], []
    router_abstain = expert_abstain = 0
    for line in lines[1:]:
        cells = line.split("\t")
        if len(cells) <= max(pos_r, pos_c):
            continue
        a, b = cells[pos_r], cells[pos_c]
        if a == "-":
            continue
        if b == "-":
            router_abstain += 1
            continue
        try:
            a_value, b_value = float(a), float(b)
        except ValueError:
            raise DataError(f"{path}: malformed radius cells {a!r}, {b!r}") from None
        if b_value == 0.0 and cells[header.index("predict")] == "-1":
            expert_abstain += 1
            continue
        r_sigma.append(a_value)
        r_c.append(b_value)
    r_sigma, r_c = np.array(r_sigma), np.array(r_c)
    delta = r_sigma - r_c
    both = len(delta)
    correct = table.correct == 1
    return {"rows": int(len(table.idx)), "both_certified": int(both), "router_abstained": int(router_abstain),
            "expert_abstained": int(expert_abstain),
            "router_bottleneck_share": round(float(np.mean(delta < 0)), 4) if both else None,
            "delta_r_sigma_quantiles": quantiles(delta),
            "accuracy": round(float(correct.mean()), 4) if len(correct) else 0.0}


def format_report(report: dict) -> str:
    """Plain-text lines for a routing and/or bottleneck report."""
    lines = []
    routing = report.get("routing", report if "routable" in report else None)
    if routing:
        lines.append(f"held-out routing: {routing.get('routable')} routable of {routing.get('images')} images")
        if "routing_accuracy" in routing:
            lines.append(f"  routing accuracy (choice attains R*): {100 * routing['routing_accuracy']:.1f}%  "
                         f"mean R* {routing['mean_best_radius']:.3f}, "
                         f"mean routed R {routing['mean_routed_radius']:.3f}")
            lines.append("  dR = R* - R_routed quantiles: " + ", ".join(f"{k} {v:.3f}" for k, v in
                                                                      routing["delta_r_quantiles"].items()))
            lines.append("  ECDF of dR: " + ", ".join(f"P[dR<={k}] {v:.3f}"
                                                      for k, v in routing["delta_r_ecdf"].items()))
    bottleneck = report.get("bottleneck")
    if bottleneck:
        share = bottleneck["router_bottleneck_share"]
        lines.append(f"certify results: {bottleneck['both_certified']} rows with both stages certified; "
                     f"R_sigma < R_c (router is the bottleneck) in "
                     f"{'n/a' if share is None else f'{100 * share:.1f}%'}; router abstained "
                     f"{bottleneck['router_abstained']}, expert abstained {bottleneck['expert_abstained']}")
        if bottleneck["delta_r_sigma_quantiles"]:
            lines.append("  R_sigma - R_c quantiles: " + ", ".join(
                f"{k} {v:.3f}" for k, v in bottleneck["delta_r_sigma_quantiles"].items()))
    return "\n".join(lines)
