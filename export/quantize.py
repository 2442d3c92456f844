"""Static int8 (QDQ) quantization of an exported ``model.onnx`` into ``model.int8.onnx``.

Why static QDQ: dynamic quantization (ConvInteger) runs 4-13x *slower* than fp32 on
these CPUs, while static QDQ runs faster (PLATFORM_NOTES). Why calibrate on noisy
inputs at the expert's own sigma: under randomized smoothing the network only ever
sees x + N(0, sigma^2 I); activation ranges calibrated on clean images (or at a smaller
sigma) clip those inputs, and argmax agreement with fp32 collapsed from 99.7% to 64%
when a sigma = 1.0 expert was calibrated at 0.25.

The quantized network is a different base classifier: certificates computed with it
are valid for it (randomized smoothing certifies whatever network runs), and the
precision is recorded with each run. Agreement with fp32 must be measured, not assumed
(``benchmarks/bench_engines.py``).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np

from dualrs_route.experts.errors import EngineUnavailableError, ModelFormatError
from dualrs_route.experts.folders import ONNX_FILE

from .onnx_export import INPUT_NAME, as_folder
from .runtime import INT8_FILE

DEFAULT_CALIBRATION_SAMPLES = 512
CALIBRATION_BATCH = 64


def calibration_batches(images: np.ndarray | None, input_shape, sigma: float, *,
                        samples: int = DEFAULT_CALIBRATION_SAMPLES, batch: int = CALIBRATION_BATCH,
                        seed: int = 0) -> list[np.ndarray]:
    """float32 [<= batch, *input_shape] batches of noisy calibration inputs, ``samples`` in all.

    Each input is an image (drawn with replacement from ``images``, float32
    [M, *input_shape] in [0, 1]; smooth synthetic images when None) plus Gaussian
    noise of standard deviation ``sigma`` in pixel units, unclipped, exactly what the
    network sees during certification.
    """
    if samples < 1 or batch < 1:
        raise ValueError(f"calibration needs samples >= 1 and batch >= 1, got {samples} and {batch}")
    rng = np.random.default_rng(seed)
    shape = tuple(int(d) for d in input_shape)
    if images is not None:
        images = np.asarray(images, dtype=np.float32)
        if images.ndim != 4 or tuple(images.shape[1:]) != shape or not len(images):
            raise ModelFormatError(f"calibration images must be float32 [M, {', '.join(map(str, shape))}], got "
                                   f"{list(images.shape)}")
    out = []
    for start in range(0, samples, batch):
        b = min(batch, samples - start)
        if images is not None:
            clean = images[rng.integers(0, len(images), size=b)]
        else:
            c, h, w = shape
            coarse = rng.random((b, c, 4, 4), dtype=np.float32)
            clean = np.repeat(np.repeat(coarse, -(-h // 4), axis=2), -(-w // 4), axis=3)[:, :, :h, :w]
        noisy = clean + np.float32(sigma) * rng.standard_normal(clean.shape, dtype=np.float32)
        out.append(np.ascontiguousarray(noisy, dtype=np.float32))
    return out


class _NoisyReader:
    """An ``onnxruntime.quantization.CalibrationDataReader`` over precomputed batches."""

    def __init__(self, batches: list[np.ndarray], input_name: str):
        self._batches = batches
        self._input_name = input_name
        self._position = 0

    def get_next(self):
        if self._position >= len(self._batches):
            return None
        self._position += 1
        return {self._input_name: self._batches[self._position - 1]}

    def rewind(self):
        self._position = 0


def quantize_int8(folder_or_ref, *, images: np.ndarray | None = None, sigma: float | None = None,
                  samples: int = DEFAULT_CALIBRATION_SAMPLES, seed: int = 0, per_channel: bool = True) -> Path:
    """Write ``model.int8.onnx`` (static QDQ, int8 weights per channel, uint8 activations) next to ``model.onnx``.

    ``images``: real calibration images, float32 [M, C, H, W] in [0, 1] (strongly
    recommended; synthetic smooth images are used when None). ``sigma``: calibration
    noise level, default the folder's own sigma. Returns the written path. The file
    is written to a temporary name and renamed, so a failure leaves no partial file.
    """
    try:
        from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    except ImportError as exc:
        raise EngineUnavailableError(f"int8 quantization needs onnxruntime's quantization tools and the onnx "
                                     f"package ({exc}); `pip install 'dualrs-route[export]'`") from None
    folder = as_folder(folder_or_ref)
    source = folder.path / ONNX_FILE
    if not source.is_file():
        raise ModelFormatError(f"{folder.reference}: no {ONNX_FILE} to quantize; run "
                               f"`dualrs-route export {folder.reference} --to onnx` first")
    sigma = float(folder.config.sigma if sigma is None else sigma)
    if not sigma > 0:
        raise ValueError(f"calibration sigma must be > 0, got {sigma}")
    batches = calibration_batches(images, folder.config.input_shape, sigma, samples=samples, seed=seed)
    final = folder.path / INT8_FILE
    with tempfile.TemporaryDirectory(dir=folder.path, prefix=".quantize-") as work:
        prepared = Path(work) / "prepared.onnx"
        try:
            from onnxruntime.quantization.shape_inference import quant_pre_process

            quant_pre_process(str(source), str(prepared), skip_symbolic_shape=True)
        except Exception:  # pre-processing (BN folding, shape inference) only helps; quantize the raw graph
            prepared = source
        tmp = Path(work) / INT8_FILE
        try:
            quantize_static(str(prepared), str(tmp), _NoisyReader(batches, INPUT_NAME),
                            quant_format=QuantFormat.QDQ, per_channel=per_channel, activation_type=QuantType.QUInt8,
                            weight_type=QuantType.QInt8, calibrate_method=CalibrationMethod.MinMax)
        except Exception as exc:  # onnxruntime.quantization raises plain Exceptions of many kinds
            raise ModelFormatError(f"{folder.reference}: static int8 quantization of {source.name} failed: "
                                   f"{' '.join(str(exc).split())[:300]}") from None
        os.replace(tmp, final)
    return final
