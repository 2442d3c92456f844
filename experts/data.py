"""Datasets as float32 [C, H, W] pixels in [0, 1] with integer labels.

* ``digits``: scikit-learn's bundled 8x8 digits (1,797 images, pixel values 0..16
  divided by 16). Fixed split: a permutation with ``numpy.random.default_rng(0)``;
  its first 1,437 indices are ``train`` and the last 360 are ``test``, each kept in
  ascending index order.
* ``cifar10`` with ``--data``: the official ``cifar-10-batches-py`` folder (read with a
  restricted unpickler that builds only numpy arrays), a folder holding
  ``cifar10_{split}.npz``, or an npz file itself.
* ``npz:PATH``: ``x`` uint8 [N, H, W, C] (divided by 255) or float32 [N, C, H, W] in
  [0, 1], and ``y`` int [N].

Cohen's ``--skip K --max M``: examples i with i % K == 0 and i < M (M < 0: no limit).
"""

from __future__ import annotations

import io
import pickle
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import DataError

DIGITS_TEST_SIZE = 360
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)


@dataclass
class Dataset:
    """Images (uint8 NHWC or float32 NCHW) with labels; :meth:`image` returns float32 [C, H, W]."""

    name: str
    split: str
    images: np.ndarray
    labels: np.ndarray
    class_names: tuple[str, ...] | None = None

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        if self.images.dtype == np.uint8:
            _, h, w, c = self.images.shape
            return (c, h, w)
        return tuple(self.images.shape[1:])

    def image(self, i: int) -> np.ndarray:
        return self.batch([i])[0]

    def batch(self, indices) -> np.ndarray:
        """float32 [len(indices), C, H, W] in [0, 1]."""
        picked = self.images[np.asarray(indices, dtype=np.int64)]
        if picked.dtype == np.uint8:
            return np.ascontiguousarray(picked.transpose(0, 3, 1, 2), dtype=np.float32) / np.float32(255.0)
        return np.ascontiguousarray(picked, dtype=np.float32)


def select_indices(length: int, skip: int = 1, max_index: int = -1) -> list[int]:
    """Cohen's certify.py selection: every ``skip``-th index below ``max_index`` (< 0: all)."""
    if skip < 1:
        raise DataError(f"--skip must be >= 1, got {skip}")
    stop = length if max_index < 0 else min(length, max_index)
    return list(range(0, stop, skip))


def check_images(dataset: Dataset, indices, input_shape=None) -> None:
    """Raise DataError if the selected images have the wrong shape, NaN/inf or values outside [0, 1]."""
    if input_shape is not None and tuple(dataset.input_shape) != tuple(input_shape):
        raise DataError(f"dataset {dataset.name} has images of shape [C, H, W] = {list(dataset.input_shape)} "
                        f"but the model expects input_shape {list(input_shape)}")
    if dataset.images.dtype == np.uint8:
        return
    for start in range(0, len(indices), 4096):
        chunk = dataset.batch(indices[start:start + 4096])
        bad = ~np.isfinite(chunk).reshape(len(chunk), -1).all(axis=1)
        if bad.any():
            first = indices[start + int(np.argmax(bad))]
            raise DataError(f"dataset {dataset.name}: example {first} has NaN or infinite pixels "
                            f"({int(bad.sum())} such examples in this chunk); fix the data or skip them")
        if chunk.size and (chunk.min() < 0.0 or chunk.max() > 1.0):
            raise DataError(f"dataset {dataset.name}: pixel values must lie in [0, 1], found "
                            f"[{chunk.min():.4g}, {chunk.max():.4g}]; scale the data (noise and radii are in [0, 1] units)")


def load_dataset(name: str, *, split: str = "test", data: str | None = None) -> Dataset:
    """Load ``digits``, ``cifar10`` (needs ``data``) or ``npz:PATH``."""
    if split not in ("train", "test"):
        raise DataError(f"--split must be 'train' or 'test', got {split!r}")
    if name == "digits":
        return _load_digits(split)
    if name == "cifar10":
        if not data:
            raise DataError("--dataset cifar10 needs --data: the cifar-10-batches-py folder, a folder with "
                            "cifar10_test.npz/cifar10_train.npz, or one such npz file")
        return _load_cifar10(Path(data), split)
    if name.startswith("npz:"):
        return _load_npz(Path(name[4:]), name, split)
    raise DataError(f"unknown dataset {name!r}; use digits, cifar10 (with --data) or npz:PATH")


def _load_digits(split: str) -> Dataset:
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise DataError("--dataset digits needs scikit-learn: pip install 'dualrs-route[demo]' "
                        "(or pip install scikit-learn)") from None
    bunch = load_digits()
    images = (bunch.images.astype(np.float32) / np.float32(16.0))[:, None, :, :]
    order = np.random.default_rng(0).permutation(len(images))
    cut = len(images) - DIGITS_TEST_SIZE
    chosen = np.sort(order[:cut] if split == "train" else order[cut:])
    return Dataset("digits", split, np.ascontiguousarray(images[chosen]), bunch.target[chosen].astype(np.int64),
                   tuple(str(i) for i in range(10)))


def _npz_arrays(path: Path, label: str) -> tuple[np.ndarray, np.ndarray, tuple | None]:
    """Arrays ``x``, ``y`` (and ``classes``) of an npz file, never unpickling anything."""
    try:
        with open(path, "rb") as handle:
            is_zip = handle.read(4) == b"PK\x03\x04"
    except OSError as exc:
        raise DataError(f"{label}: cannot read {path}: {exc.strerror or exc}") from None
    if not is_zip:  # np.load would try it as a pickle and suggest allow_pickle
        raise DataError(f"{label}: {path} is not an npz file (a zip archive of .npy arrays, as numpy.savez writes)")
    try:
        with np.load(path, allow_pickle=False) as archive:
            if "x" not in archive or "y" not in archive:
                raise DataError(f"{label}: npz must hold arrays 'x' and 'y', found {sorted(archive.files)}")
            x, y = archive["x"], archive["y"]
            classes = tuple(str(c) for c in archive["classes"]) if "classes" in archive else None
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        detail = "it holds object arrays (pickles), which are not loaded" if "allow_pickle" in str(exc) else exc
        raise DataError(f"{label}: cannot read {path}: {detail}") from None
    return x, y, classes


def _validated(name: str, split: str, x: np.ndarray, y: np.ndarray, classes) -> Dataset:
    if x.ndim != 4:
        raise DataError(f"{name}: 'x' must be 4-D (uint8 [N, H, W, C] or float32 [N, C, H, W]), got shape {list(x.shape)}")
    if x.dtype != np.uint8:
        if not np.issubdtype(x.dtype, np.floating):
            raise DataError(f"{name}: 'x' must be uint8 or float, got {x.dtype}")
        x = x.astype(np.float32, copy=False)
    if y.ndim != 1 or len(y) != len(x) or not np.issubdtype(y.dtype, np.integer):
        raise DataError(f"{name}: 'y' must be int [N] with N = {len(x)}, got {y.dtype} {list(y.shape)}")
    return Dataset(name, split, x, y.astype(np.int64), classes)


def _load_npz(path: Path, label: str, split: str) -> Dataset:
    if not path.is_file():
        raise DataError(f"{label}: no such file {path}")
    x, y, classes = _npz_arrays(path, label)
    return _validated(label, split, x, y, classes)


class _ArrayOnlyUnpickler(pickle.Unpickler):
    """Unpickler for CIFAR batches that refuses every global but numpy's array constructors."""

    _ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
                ("numpy", "ndarray"), ("numpy", "dtype")}

    def find_class(self, module, name):
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a CIFAR batch file")


def _load_cifar10(data: Path, split: str) -> Dataset:
    if data.is_file():
        x, y, classes = _npz_arrays(data, "cifar10")
        return _validated("cifar10", split, x, y, classes or CIFAR10_CLASSES)
    for candidate in (data / f"cifar10_{split}.npz",):
        if candidate.is_file():
            x, y, classes = _npz_arrays(candidate, "cifar10")
            return _validated("cifar10", split, x, y, classes or CIFAR10_CLASSES)
    batches = data / "cifar-10-batches-py" if (data / "cifar-10-batches-py").is_dir() else data
    names = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    if not all((batches / n).is_file() for n in names):
        raise DataError(f"cifar10: {data} holds neither cifar10_{split}.npz nor the cifar-10-batches-py files {names}")
    xs, ys = [], []
    for n in names:
        x, y = _cifar_batch(batches / n)
        xs.append(x)
        ys.append(y)
    return Dataset("cifar10", split, np.ascontiguousarray(np.concatenate(xs)), np.concatenate(ys), CIFAR10_CLASSES)


def _cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Images uint8 [n, 32, 32, 3] and labels of one ``cifar-10-batches-py`` file: a pickled dict
    with b'data' (uint8 [n, 3072]) and b'labels' (n ints), read with :class:`_ArrayOnlyUnpickler`."""
    def bad(why: str) -> DataError:
        return DataError(f"cifar10: {path} is not a CIFAR batch file: {why}")

    try:
        entry = _ArrayOnlyUnpickler(io.BytesIO(path.read_bytes()), encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError,
            MemoryError) as exc:
        raise bad(str(exc) or type(exc).__name__) from None
    if not isinstance(entry, dict) or b"data" not in entry or b"labels" not in entry:
        found = sorted(map(repr, entry)) if isinstance(entry, dict) else type(entry).__name__
        raise bad(f"expected a dict with b'data' and b'labels', found {found}")
    try:
        data = np.asarray(entry[b"data"])
        labels = np.asarray(entry[b"labels"])
    except (TypeError, ValueError) as exc:
        raise bad(f"unreadable b'data' or b'labels' ({exc})") from None
    if (data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or labels.ndim != 1
            or len(labels) != len(data) or not np.issubdtype(labels.dtype, np.integer)):
        raise bad(f"b'data' must be uint8 [n, 3072] and b'labels' n integers, got {data.dtype} {list(data.shape)} "
                  f"and {labels.dtype} {list(labels.shape)}")
    return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), labels.astype(np.int64)
