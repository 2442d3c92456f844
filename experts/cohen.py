"""Import Cohen et al.'s checkpoints (``checkpoint.pth.tar`` from locuslab/smoothing).

Their models are ``Sequential(NormalizeLayer, resnet)`` (keys ``1.conv1.weight``, ...),
sometimes inside ``DataParallel`` (``module.`` prefix). The pickle is opened with
``torch.load(weights_only=True)``, which builds tensors and plain containers only.
"""

from __future__ import annotations

import pickle
from pathlib import Path

from .data import CIFAR10_CLASSES
from .errors import ModelFormatError
from .architectures import build_model
from .folders import ModelConfig, save_folder

# The normalisation Cohen et al.'s CIFAR-10 models were trained with (their code/datasets.py). It differs
# from the true CIFAR-10 channel std in experts.data.CIFAR10_STD; an imported model must keep its own.
COHEN_CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
COHEN_CIFAR10_STD = (0.2023, 0.1994, 0.2010)
DATASETS = {"cifar10": dict(num_classes=10, input_shape=(3, 32, 32), mean=COHEN_CIFAR10_MEAN, std=COHEN_CIFAR10_STD,
                            class_names=CIFAR10_CLASSES)}
COHEN_ARCHS = ("cifar_resnet20", "cifar_resnet110")


def import_cohen_checkpoint(checkpoint: str, out_dir: str, *, sigma: float, dataset: str = "cifar10",
                            arch: str | None = None, overwrite: bool = False) -> Path:
    """Convert a Cohen checkpoint into an expert folder and check that it loads strictly."""
    import torch

    try:
        payload = torch.load(checkpoint, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError) as exc:
        raise ModelFormatError(f"{checkpoint}: not a loadable checkpoint with weights_only=True "
                               f"({' '.join(str(exc).split())[:300]})") from None
    state = payload.get("state_dict", payload) if isinstance(payload, dict) else None
    if not isinstance(state, dict) or not state:
        raise ModelFormatError(f"{checkpoint}: expected a dict with a 'state_dict' of tensors")
    arch = arch or (payload.get("arch") if isinstance(payload, dict) else None)
    if arch not in COHEN_ARCHS:
        raise ModelFormatError(f"{checkpoint}: architecture {arch!r} is not one of {COHEN_ARCHS}; pass --arch")
    cleaned = {}
    for key, value in state.items():
        key = key[len("module."):] if key.startswith("module.") else key
        if not key.startswith("1."):
            raise ModelFormatError(f"{checkpoint}: key {key!r} is not in Cohen's Sequential(NormalizeLayer, model) "
                                   "layout (keys start with '1.')")
        cleaned[key] = value
    spec = DATASETS[dataset]
    config = ModelConfig(kind="expert", sigma=float(sigma), num_classes=spec["num_classes"],
                         input_shape=spec["input_shape"], mean=tuple(spec["mean"]), std=tuple(spec["std"]),
                         architecture=arch, architecture_args={}, class_names=spec["class_names"],
                         name=Path(out_dir).name,
                         extra={"imported_from": {"checkpoint": str(Path(checkpoint).name),
                                                  "format": "Cohen et al. 2019 (locuslab/smoothing)"}})
    model = build_model(arch, num_classes=config.num_classes, input_shape=config.input_shape, mean=config.mean,
                        std=config.std)
    try:  # strict: every key present, none extra, every shape right; checked before anything is written
        model.load_state_dict(cleaned, strict=True)
    except RuntimeError as exc:
        raise ModelFormatError(f"{checkpoint}: weights do not fit {arch}: {' '.join(str(exc).split())[:400]}") from None
    return save_folder(out_dir, config, model, overwrite=overwrite)
