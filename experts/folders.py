"""Expert and router folders: ``config.json`` plus ``model.safetensors`` and/or ``model.onnx``.

A folder is named by a *reference*:

* ``hf://org/repo`` or ``hf://org/repo@revision``: a Hugging Face Hub repository,
  fetched (or found in the local cache) with ``huggingface_hub.snapshot_download``.
  ``HF_HUB_OFFLINE=1`` is honoured at call time: then only the cache is used.
* ``builtin:NAME``: a folder shipped inside this package (the demo zoo).
* anything else: a local folder path (relative paths resolve against ``base_dir``,
  for a router's expert list: the router's own folder).

Loading never executes code: safetensors or ONNX only, weights loaded with
``strict=True``. Each folder records its resolved revision and the sha256 of every
weight file for the run metadata.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .atomic import atomic_write_json, atomic_write_with
from .errors import ModelFormatError, ModelNotFoundError

CONFIG_FILE = "config.json"
SAFETENSORS_FILE = "model.safetensors"
ONNX_FILE = "model.onnx"
INT8_ONNX_FILE = "model.int8.onnx"
KINDS = ("expert", "router")
HUB_PREFIX = "hf://"
BUILTIN_PREFIX = "builtin:"
_ZOO_DIRS = (Path(__file__).resolve().parent / "zoo", Path(__file__).resolve().parent.parent / "router" / "zoo")


@dataclass(frozen=True)
class ModelConfig:
    """The validated contents of ``config.json``. See the README for every field."""

    kind: str
    sigma: float
    num_classes: int
    input_shape: tuple[int, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    architecture: str | None = None
    architecture_args: dict = field(default_factory=dict)
    class_names: tuple[str, ...] | None = None
    experts: tuple[str, ...] | None = None
    name: str | None = None
    logit_offsets: tuple[float, ...] | None = None
    extra: dict = field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: Any, source: str) -> "ModelConfig":
        """Validate a parsed config; every problem raises ModelFormatError naming ``source``."""

        def bad(message: str) -> ModelFormatError:
            return ModelFormatError(f"{source}: config.json {message}")

        if not isinstance(data, dict):
            raise bad("must be a JSON object")
        kind = data.get("kind")
        if kind not in KINDS:
            raise bad(f"'kind' must be one of {list(KINDS)}, got {kind!r}")
        sigma = data.get("sigma")
        if isinstance(sigma, bool) or not isinstance(sigma, (int, float)) or not math.isfinite(sigma) or sigma <= 0:
            raise bad(f"'sigma' must be a number > 0, got {sigma!r}")
        shape = data.get("input_shape")
        if (not isinstance(shape, list) or len(shape) != 3
                or not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in shape)):
            raise bad(f"'input_shape' must be [C, H, W] of positive integers, got {shape!r}")
        experts = data.get("experts")
        if kind == "router":
            if not isinstance(experts, list) or not experts or not all(isinstance(e, str) and e for e in experts):
                raise bad("of a router needs 'experts': a non-empty list of expert references")
            num_classes = data.get("num_classes", len(experts))
        else:
            if experts is not None:
                raise bad("of an expert must not have 'experts' (only routers route)")
            num_classes = data.get("num_classes")
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise bad(f"'num_classes' must be an integer >= 1, got {num_classes!r}")
        if kind == "router" and num_classes != len(experts):
            raise bad(f"of a router has num_classes={num_classes} but lists {len(experts)} experts")
        stats = {}
        for key in ("mean", "std"):
            value = data.get(key, [0.0] * shape[0] if key == "mean" else [1.0] * shape[0])
            if (not isinstance(value, list) or len(value) != shape[0]
                    or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)):
                raise bad(f"'{key}' must be a list of {shape[0]} numbers (one per channel), got {value!r}")
            stats[key] = tuple(float(v) for v in value)
        if any(s <= 0 for s in stats["std"]):
            raise bad(f"'std' values must be > 0, got {list(stats['std'])}")
        architecture = data.get("architecture")
        if architecture is not None and not isinstance(architecture, str):
            raise bad(f"'architecture' must be a string, got {architecture!r}")
        architecture_args = data.get("architecture_args", {}) or {}
        if not isinstance(architecture_args, dict):
            raise bad(f"'architecture_args' must be an object, got {architecture_args!r}")
        class_names = data.get("class_names")
        if class_names is not None:
            if not isinstance(class_names, list) or len(class_names) != num_classes:
                raise bad(f"'class_names' must list {num_classes} names, got {class_names!r}")
            class_names = tuple(str(c) for c in class_names)
        name = data.get("name")
        offsets = data.get("logit_offsets")
        if offsets is not None and (
                not isinstance(offsets, list) or len(offsets) != num_classes
                or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in offsets)):
            raise bad(f"'logit_offsets' must list {num_classes} finite numbers (one per class), got {offsets!r}")
        known = {"kind", "sigma", "num_classes", "input_shape", "mean", "std", "architecture",
                 "architecture_args", "class_names", "experts", "name", "logit_offsets"}
        return cls(
            kind=kind, sigma=float(sigma), num_classes=int(num_classes), input_shape=tuple(shape),
            mean=stats["mean"], std=stats["std"], architecture=architecture,
            architecture_args=dict(architecture_args), class_names=class_names,
            experts=tuple(experts) if experts is not None else None,
            name=str(name) if name is not None else None,
            logit_offsets=tuple(float(v) for v in offsets) if offsets is not None else None,
            extra={k: v for k, v in data.items() if k not in known},
        )

    def to_dict(self) -> dict:
        out: dict[str, Any] = {"kind": self.kind}
        if self.name is not None:
            out["name"] = self.name
        out.update(sigma=self.sigma, num_classes=self.num_classes, input_shape=list(self.input_shape),
                   mean=list(self.mean), std=list(self.std))
        if self.class_names is not None:
            out["class_names"] = list(self.class_names)
        if self.architecture is not None:
            out["architecture"] = self.architecture
            out["architecture_args"] = dict(self.architecture_args)
        if self.experts is not None:
            out["experts"] = list(self.experts)
        if self.logit_offsets is not None:
            out["logit_offsets"] = list(self.logit_offsets)
        out.update(self.extra)
        return out

    # Fields that change what the model computes (or, for a router, which experts it routes to).
    # Names, class names and training records are documentation and may change freely.
    COMPUTATIONAL_FIELDS = ("kind", "sigma", "num_classes", "input_shape", "mean", "std", "architecture",
                            "architecture_args", "experts", "logit_offsets")

    def computational_sha256(self) -> str:
        """sha256 of the canonical JSON (sorted keys, no whitespace) of :attr:`COMPUTATIONAL_FIELDS`:
        equal exactly when two configs make the same network compute the same certificates."""
        data = self.to_dict()
        picked = {key: data.get(key) for key in self.COMPUTATIONAL_FIELDS}
        text = json.dumps(picked, sort_keys=True, separators=(",", ":"), allow_nan=False)
        return hashlib.sha256(text.encode()).hexdigest()


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}


def parse_hub_reference(reference: str) -> tuple[str, str | None]:
    """``hf://org/repo[@revision]`` -> (repo_id, revision or None)."""
    body = reference[len(HUB_PREFIX):]
    repo_id, _, revision = body.partition("@")
    parts = repo_id.split("/")
    if len(parts) != 2 or not all(parts):
        raise ModelNotFoundError(f"{reference}: a Hub reference must look like hf://org/repo or hf://org/repo@revision")
    return repo_id, (revision or None)


HUB_FILES = (CONFIG_FILE, SAFETENSORS_FILE, ONNX_FILE, ONNX_FILE + ".data", "README.md")
# The model files at the top of a repository and in its subfolders: a router repository may hold its
# experts as folders inside it (listed by relative path; check_listed_reference keeps them inside).
HUB_PATTERNS = [pattern for name in HUB_FILES for pattern in (name, f"*/{name}")]


def _download_from_hub(reference: str, cache_dir: str | None) -> tuple[Path, str]:
    from huggingface_hub import snapshot_download
    from huggingface_hub import errors as hf_errors

    repo_id, revision = parse_hub_reference(reference)
    offline = _hub_offline()
    try:
        path = snapshot_download(
            repo_id=repo_id, revision=revision, cache_dir=cache_dir, local_files_only=offline,
            allow_patterns=HUB_PATTERNS,
        )
    except hf_errors.LocalEntryNotFoundError:
        how = ("HF_HUB_OFFLINE is set, so only the local cache is searched"
               if offline else "the Hub could not be reached and it is not in the local cache")
        raise ModelNotFoundError(
            f"{reference}: model not available: {how}. Download it on a connected machine "
            f"(`hf download {repo_id}`), unset HF_HUB_OFFLINE, or pass a local folder with the same layout"
        ) from None
    except hf_errors.RevisionNotFoundError:
        raise ModelNotFoundError(f"{reference}: revision {revision!r} does not exist in {repo_id}") from None
    except hf_errors.RepositoryNotFoundError:
        raise ModelNotFoundError(
            f"{reference}: repository {repo_id} not found on the Hub (or it is private: log in with `hf auth login`)"
        ) from None
    except (hf_errors.HfHubHTTPError, OSError) as exc:
        raise ModelNotFoundError(f"{reference}: could not download from the Hub: {exc}") from None
    path = Path(path)
    resolved = path.name if path.parent.name == "snapshots" else (revision or "unknown")
    return path, resolved


def resolve_reference(reference: str, *, base_dir: str | os.PathLike | None = None,
                      cache_dir: str | None = None) -> tuple[Path, str]:
    """Turn a reference into (local folder, resolved revision).

    The revision is the Hub commit hash for ``hf://`` references and ``"local"``
    otherwise (the file hashes identify local weights).
    """
    if not isinstance(reference, str) or not reference.strip():
        raise ModelNotFoundError(f"empty model reference {reference!r}")
    if reference.startswith(HUB_PREFIX):
        return _download_from_hub(reference, cache_dir)
    if reference.startswith(BUILTIN_PREFIX):
        name = reference[len(BUILTIN_PREFIX):]
        if name not in builtin_names():  # names only: no path may escape the bundled zoo
            raise ModelNotFoundError(f"{reference}: no built-in model named {name!r}; built-in: "
                                     f"{', '.join(builtin_names())}")
        for zoo in _ZOO_DIRS:
            if (zoo / name / CONFIG_FILE).is_file():
                return zoo / name, "builtin"
        raise ModelNotFoundError(f"{reference}: no built-in model named {name!r}; built-in: {', '.join(builtin_names())}")
    path = Path(reference).expanduser()
    if not path.is_absolute() and base_dir is not None:
        path = Path(base_dir) / path
    if not path.exists():
        raise ModelNotFoundError(
            f"{reference}: no such folder ({path}); pass a folder holding config.json and model.safetensors "
            "or model.onnx, hf://org/repo[@revision], or builtin:NAME"
        )
    if not path.is_dir():
        raise ModelNotFoundError(f"{reference}: {path} is a file; pass the folder that holds config.json")
    return path.resolve(), "local"


def builtin_names() -> list[str]:
    return sorted(p.name for zoo in _ZOO_DIRS if zoo.is_dir() for p in zoo.iterdir() if (p / CONFIG_FILE).is_file())


@dataclass
class ModelFolder:
    """A resolved, validated model folder."""

    reference: str
    path: Path
    config: ModelConfig
    revision: str
    files: dict[str, str]

    @property
    def name(self) -> str:
        return self.config.name or (self.reference.rsplit("/", 1)[-1] if self.reference.startswith(HUB_PREFIX)
                                    else self.path.name)

    @property
    def has_torch_weights(self) -> bool:
        return SAFETENSORS_FILE in self.files

    @property
    def has_onnx(self) -> bool:
        return ONNX_FILE in self.files

    def network_file(self, engine: str, precision: str = "fp32") -> str:
        """The file that runs on ``engine`` (torch, onnxruntime, tensorrt) at ``precision``."""
        if engine == "torch":
            return SAFETENSORS_FILE
        if engine == "onnxruntime" and precision == "int8":
            return INT8_ONNX_FILE
        return ONNX_FILE

    def fingerprint(self, engine: str, precision: str = "fp32") -> dict:
        """What identifies the computation for resume checks: the sha256 of the one network file
        that runs (other files in the folder, e.g. a later ONNX export, do not matter) and the
        canonical hash of the config's computational fields."""
        name = self.network_file(engine, precision)
        digest = self.files.get(name)
        if digest is None:  # make_counter refuses this first; recomputed only for a file created since loading
            digest = sha256_file(self.path / name) if (self.path / name).is_file() else None
        return {"sha256": {name: digest}, "config_sha256": self.config.computational_sha256()}

    def provenance(self) -> dict:
        """What the run metadata records about this model."""
        return {"reference": self.reference, "name": self.name, "kind": self.config.kind,
                "sigma": self.config.sigma, "revision": self.revision, "path": str(self.path),
                "sha256": dict(self.files), "config_sha256": self.config.computational_sha256()}

    def load_torch_model(self):
        """Build the registered architecture and load ``model.safetensors`` with strict=True."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        from . import architectures

        cfg = self.config
        if not self.has_torch_weights:
            raise ModelFormatError(f"{self.reference}: no {SAFETENSORS_FILE} in {self.path}; use --engine onnxruntime")
        if not cfg.architecture:
            raise ModelFormatError(f"{self.reference}: config.json has no 'architecture', needed to load "
                                   f"{SAFETENSORS_FILE}; known: {', '.join(architectures.available())}")
        try:
            model = architectures.build_model(cfg.architecture, num_classes=cfg.num_classes,
                                              input_shape=cfg.input_shape, mean=cfg.mean, std=cfg.std,
                                              **cfg.architecture_args)
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelFormatError(f"{self.reference}: cannot build architecture {cfg.architecture!r} "
                                   f"with {cfg.architecture_args}: {exc}") from None
        try:
            state = load_file(str(self.path / SAFETENSORS_FILE), device="cpu")
        except (SafetensorError, OSError, ValueError) as exc:
            raise ModelFormatError(f"{self.reference}: {SAFETENSORS_FILE} is corrupt or unreadable ({exc}); "
                                   "re-download or re-export it") from None
        # strict=False only so that missing and unexpected keys are reported together below;
        # any of them is an error, which makes this exactly as strict as strict=True.
        try:
            result = model.load_state_dict(state, strict=False)
        except RuntimeError as exc:  # shape mismatches
            detail = " ".join(str(exc).split())[:400]
            raise ModelFormatError(f"{self.reference}: config.json does not match the weights "
                                   f"(architecture {cfg.architecture!r}): {detail}") from None
        problems = []
        if result.missing_keys:
            problems.append(f"missing {len(result.missing_keys)} keys (e.g. {result.missing_keys[:3]})")
        if result.unexpected_keys:
            problems.append(f"unexpected {len(result.unexpected_keys)} keys (e.g. {result.unexpected_keys[:3]})")
        if problems:
            raise ModelFormatError(f"{self.reference}: config.json does not match the weights "
                                   f"(architecture {cfg.architecture!r}): {'; '.join(problems)}")
        return model.eval()


def load_folder(reference: str, *, base_dir: str | os.PathLike | None = None, expected_kind: str | None = None,
                cache_dir: str | None = None) -> ModelFolder:
    """Resolve ``reference``, read and validate its config, and hash its weight files."""
    path, revision = resolve_reference(reference, base_dir=base_dir, cache_dir=cache_dir)
    config_path = path / CONFIG_FILE
    if not config_path.is_file():
        raise ModelNotFoundError(f"{reference}: no {CONFIG_FILE} in {path}")
    try:
        data = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelFormatError(f"{reference}: {CONFIG_FILE} is not valid JSON ({exc})") from None
    config = ModelConfig.from_dict(data, reference)
    if expected_kind is not None and config.kind != expected_kind:
        raise ModelFormatError(f"{reference}: expected a {expected_kind} folder but config.json says kind={config.kind!r}")
    files = {name: sha256_file(path / name) for name in (SAFETENSORS_FILE, ONNX_FILE, INT8_ONNX_FILE)
             if (path / name).is_file()}
    if not files:
        raise ModelNotFoundError(f"{reference}: {path} has neither {SAFETENSORS_FILE} nor {ONNX_FILE}")
    return ModelFolder(reference=reference, path=path, config=config, revision=revision, files=files)


PACKAGE_ROOT = Path(__file__).resolve().parent.parent
"""The folder that holds the bundled zoos (``experts/zoo``, ``router/zoo``): a built-in router's
experts must lie inside it."""


def check_listed_reference(router: ModelFolder, reference: str) -> None:
    """Refuse an expert reference that a Hub or built-in router lists but that leaves its home.

    ``hf://`` and ``builtin:`` references are always allowed. A path listed by a router from
    the Hub must be relative and stay inside the router's snapshot; one listed by a built-in
    router must stay inside the package (:data:`PACKAGE_ROOT`). The check is on the path's
    text (no ``..`` may climb out), before anything is read. A local router is the user's own
    folder: its relative paths resolve from the router's folder, wherever they lead."""
    if reference.startswith((HUB_PREFIX, BUILTIN_PREFIX)):
        return
    if router.reference.startswith(HUB_PREFIX):
        home, where = router.path, f"its Hub snapshot ({router.reference})"
    elif router.reference.startswith(BUILTIN_PREFIX):
        home, where = PACKAGE_ROOT, "the package"
    else:
        return
    home = os.path.normpath(home)
    target = os.path.normpath(os.path.join(router.path, reference))
    if Path(reference).expanduser().is_absolute() or os.path.commonpath([target, home]) != home:
        raise ModelFormatError(f"{router.reference}: expert reference {reference!r} points outside {where}; "
                               "a router's experts must be hf:// or builtin: references or folders inside it")


def save_folder(out_dir: str | os.PathLike, config: ModelConfig, model=None, *, overwrite: bool = False) -> Path:
    """Write ``config.json`` (+ ``model.safetensors`` from ``model``'s state dict) atomically.

    Files are written to temporary names and renamed, so a crash leaves no half-written folder.
    """
    from safetensors.torch import save_file

    out = Path(out_dir)
    if (out / CONFIG_FILE).exists() and not overwrite:
        raise FileExistsError(f"{out} already holds a model; pass overwrite=True (--force) to replace it")
    out.mkdir(parents=True, exist_ok=True)
    if model is not None:
        state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        atomic_write_with(out / SAFETENSORS_FILE, lambda tmp: save_file(state, tmp, metadata={"format": "pt"}))
    atomic_write_json(out / CONFIG_FILE, config.to_dict())
    return out
