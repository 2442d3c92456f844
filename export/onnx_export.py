"""Export an expert or router folder's torch network to ``model.onnx``, validated against torch.

The graph takes ``pixels``: float32 [batch, C, H, W] in [0, 1] pixel units (noisy
inputs may leave [0, 1]; they are not clipped) and returns ``logits``: float32
[batch, num_classes]. The batch axis is dynamic. Normalisation (mean/std) is the
first layer of every registered architecture, so it is inside the graph and the
ONNX file needs no preprocessing. The legacy TorchScript exporter is used
(``dynamo=False``, opset 17): the dynamo exporter needs ``onnxscript``, which this
project does not depend on.

Validation runs the exported graph in ONNX Runtime (CPU) and torch on the same
inputs at several batch sizes, collects every mismatch and then raises one
:class:`~experts.errors.ExportMismatchError` listing them all. Files are written to
a temporary name and renamed only after validation passed, so a failed or
interrupted export never leaves a half-written or unvalidated ``model.onnx``.
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np

from dualrs_route.experts.atomic import atomic_write_json, atomic_write_with
from dualrs_route.experts.errors import ExportMismatchError, ModelFormatError
from dualrs_route.experts.folders import CONFIG_FILE, ONNX_FILE, SAFETENSORS_FILE, ModelFolder, load_folder

INPUT_NAME = "pixels"
OUTPUT_NAME = "logits"
DEFAULT_OPSET = 17
VALIDATION_BATCHES = (1, 7, 64)
ATOL = 1e-4
RTOL = 1e-3


def as_folder(folder_or_ref) -> ModelFolder:
    """A :class:`ModelFolder` from a folder object, a reference string or a path."""
    if isinstance(folder_or_ref, ModelFolder):
        return folder_or_ref
    return load_folder(str(folder_or_ref))


def _target_folder(folder: ModelFolder, out_dir, *, copy_weights: bool) -> Path:
    """The folder that receives the export: the source itself, or ``out_dir`` with a config copy.

    A router's relative expert references are rewritten to absolute paths in the copy,
    because they would otherwise resolve against the new folder.
    """
    if out_dir is None:
        return folder.path
    out = Path(out_dir).expanduser()
    if out.exists() and not out.is_dir():
        raise ModelFormatError(f"--out {out} is a file; give a folder for the exported model")
    if out.resolve() == folder.path.resolve():
        return folder.path
    out.mkdir(parents=True, exist_ok=True)
    config = json.loads((folder.path / CONFIG_FILE).read_text())
    if config.get("kind") == "router" and isinstance(config.get("experts"), list):
        fixed = []
        for ref in config["experts"]:
            if isinstance(ref, str) and not ref.startswith(("hf://", "builtin:")) and not Path(ref).is_absolute():
                ref = str((folder.path / ref).resolve())
            fixed.append(ref)
        config["experts"] = fixed
    atomic_write_json(out / CONFIG_FILE, config)
    if copy_weights and folder.has_torch_weights:
        atomic_write_with(out / SAFETENSORS_FILE, lambda tmp: shutil.copyfile(folder.path / SAFETENSORS_FILE, tmp))
    return out


def validation_inputs(input_shape: Sequence[int], sigma: float, *, images: np.ndarray | None = None,
                      batch_sizes: Sequence[int] = VALIDATION_BATCHES, seed: int = 0) -> list[tuple[str, np.ndarray]]:
    """Named float32 [b, C, H, W] test batches for each ``b`` in ``batch_sizes``.

    * ``uniform``: i.i.d. uniform pixels in [0, 1];
    * ``images+noise``: ``images`` (real images, float32 [M, C, H, W] in [0, 1]) when
      given, else smooth synthetic images (upsampled 4x4 random patterns), plus
      Gaussian noise at ``sigma``, unclipped: what the network sees while certifying.
    """
    rng = np.random.default_rng(seed)
    shape = tuple(int(d) for d in input_shape)
    c, h, w = shape
    out = []
    for b in batch_sizes:
        out.append((f"uniform b={b}", rng.random((b, *shape), dtype=np.float32)))
        if images is not None and len(images):
            picked = np.asarray(images, dtype=np.float32)[rng.integers(0, len(images), size=b)]
            label = "images+noise"
        else:
            coarse = rng.random((b, c, 4, 4), dtype=np.float32)
            picked = np.repeat(np.repeat(coarse, -(-h // 4), axis=2), -(-w // 4), axis=3)[:, :, :h, :w]
            label = "smooth+noise"
        noisy = picked + np.float32(sigma) * rng.standard_normal(picked.shape, dtype=np.float32)
        out.append((f"{label} b={b}", np.ascontiguousarray(noisy, dtype=np.float32)))
    return out


def compare_outputs(name: str, reference: np.ndarray, candidate: np.ndarray, *, atol: float = ATOL,
                    rtol: float = RTOL) -> list[str]:
    """Mismatch descriptions (empty when equal within tolerance) between two logit arrays [b, K].

    Logits must satisfy ``|candidate - reference| <= atol + rtol * |reference|``
    elementwise, and argmaxes must agree wherever the reference's top-two margin exceeds
    that tolerance (a closer margin is a floating-point tie, not an export error).
    """
    problems = []
    if reference.shape != candidate.shape:
        return [f"{name}: output shape {list(candidate.shape)} != torch's {list(reference.shape)}"]
    if not np.all(np.isfinite(candidate)):
        problems.append(f"{name}: {int((~np.isfinite(candidate)).sum())} non-finite logits")
    diff = np.abs(candidate.astype(np.float64) - reference.astype(np.float64))
    allowed = atol + rtol * np.abs(reference.astype(np.float64))
    bad = diff > allowed
    if bad.any():
        worst = np.unravel_index(int(np.argmax(diff - allowed)), diff.shape)
        problems.append(f"{name}: {int(bad.sum())}/{bad.size} logits differ beyond atol={atol:g}+rtol={rtol:g}; "
                        f"max |diff| {diff.max():.3g} at {tuple(int(i) for i in worst)}")
    ref_top = reference.argmax(axis=1)
    cand_top = candidate.argmax(axis=1)
    rows = np.nonzero(ref_top != cand_top)[0]
    if len(rows):
        margins = reference[rows, ref_top[rows]] - reference[rows, cand_top[rows]]
        real = rows[margins > atol + rtol * np.abs(reference[rows, ref_top[rows]])]
        if len(real):
            problems.append(f"{name}: argmax differs on {len(real)}/{len(reference)} inputs (e.g. row {int(real[0])})")
    return problems


def validate_onnx(model, onnx_path, input_shape, sigma: float, *, images: np.ndarray | None = None,
                  batch_sizes: Sequence[int] = VALIDATION_BATCHES, atol: float = ATOL, rtol: float = RTOL,
                  reference: str = "") -> int:
    """Compare ``onnx_path`` (run on the ORT CPU provider) with the torch ``model``.

    Returns the number of batches compared. Raises one :class:`ExportMismatchError`
    listing every mismatch found over all batches.
    """
    import torch

    from .providers import choose_providers, create_session

    session = create_session(onnx_path, choose_providers(device="cpu"))
    names = ([i.name for i in session.get_inputs()], [o.name for o in session.get_outputs()])
    mismatches = []
    if names != ([INPUT_NAME], [OUTPUT_NAME]):
        mismatches.append(f"graph has inputs {names[0]} and outputs {names[1]}; expected [{INPUT_NAME!r}] "
                          f"and [{OUTPUT_NAME!r}]")
    batches = validation_inputs(input_shape, sigma, images=images, batch_sizes=batch_sizes)
    model = model.eval()
    for name, batch in batches:
        with torch.inference_mode():
            expected = model(torch.from_numpy(batch)).float().numpy()
        try:
            got = session.run([OUTPUT_NAME], {INPUT_NAME: batch})[0]
        except Exception as exc:  # ORT's own exception types
            mismatches.append(f"{name}: ONNX Runtime failed: {' '.join(str(exc).split())[:200]}")
            continue
        mismatches.extend(compare_outputs(name, expected, got, atol=atol, rtol=rtol))
    if mismatches:
        raise ExportMismatchError(
            f"{reference or onnx_path}: the ONNX export disagrees with torch on {len(mismatches)} check(s); "
            "model.onnx was not written. Report this with the model's architecture", mismatches)
    return len(batches)


def export_onnx(folder_or_ref, out_dir: str | os.PathLike | None = None, *, opset: int = DEFAULT_OPSET,
                validate: bool = True, images: np.ndarray | None = None, copy_weights: bool = False,
                atol: float = ATOL, rtol: float = RTOL) -> Path:
    """Write ``model.onnx`` for an expert or router folder and return its path.

    ``folder_or_ref``: a :class:`ModelFolder` or any reference ``load_folder`` accepts;
    it needs ``model.safetensors`` and a registered architecture. The file goes into the
    folder itself, or into ``out_dir`` together with a copy of ``config.json`` (and of
    the safetensors weights with ``copy_weights``; without them the copy is an
    ONNX-only folder that runs with no torch installed).

    Graph contract: input ``pixels`` float32 [batch, C, H, W] in [0, 1] (dynamic batch),
    output ``logits`` float32 [batch, num_classes]; normalisation inside.

    With ``validate`` (default), the graph is checked against torch on
    :func:`validation_inputs` (``images`` are real images to include) before it
    replaces any existing ``model.onnx``; every mismatch is collected into one
    :class:`ExportMismatchError`.
    """
    import torch

    folder = as_folder(folder_or_ref)
    cfg = folder.config
    if not folder.has_torch_weights:
        raise ModelFormatError(f"{folder.reference}: export needs {SAFETENSORS_FILE} (found only "
                               f"{', '.join(folder.files)}); the folder is already ONNX-only")
    if not isinstance(opset, int) or opset < 13:
        raise ValueError(f"opset must be an integer >= 13, got {opset!r}")
    model = folder.load_torch_model().eval()
    target = _target_folder(folder, out_dir, copy_weights=copy_weights)
    final = target / ONNX_FILE
    dummy = torch.rand((2, *cfg.input_shape))

    def export_and_validate(tmp: str) -> None:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the legacy exporter's deprecation notice
                torch.onnx.export(model, (dummy,), str(tmp), dynamo=False, export_params=True, opset_version=opset,
                                  do_constant_folding=True, input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                                  dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}})
        except Exception as exc:  # the exporter raises many types (SymbolicValueError, RuntimeError, ...)
            raise ModelFormatError(f"{folder.reference}: torch.onnx.export (opset {opset}) failed for architecture "
                                   f"{cfg.architecture!r}: {' '.join(str(exc).split())[:300]}") from None
        _add_metadata(Path(tmp), folder)
        if validate:
            validate_onnx(model, Path(tmp), cfg.input_shape, cfg.sigma, images=images, atol=atol, rtol=rtol,
                          reference=folder.reference)

    atomic_write_with(final, export_and_validate)  # validated before it replaces model.onnx
    return final


def _add_metadata(path: Path, folder: ModelFolder) -> None:
    """Record the source weights' hash and the noise level in the ONNX metadata (needs ``onnx``)."""
    try:
        import onnx
    except ImportError:  # metadata is a convenience; the graph is complete without it
        return
    model = onnx.load(str(path))
    entries = {"dualrs.kind": folder.config.kind, "dualrs.sigma": repr(folder.config.sigma),
               "dualrs.source_sha256": folder.files.get(SAFETENSORS_FILE, ""),
               "dualrs.input": f"{INPUT_NAME}: float32 [batch, {', '.join(map(str, folder.config.input_shape))}] "
                               "pixels in [0, 1], normalised inside"}
    for key, value in entries.items():
        prop = model.metadata_props.add()
        prop.key, prop.value = key, value
    onnx.save(model, str(path))
