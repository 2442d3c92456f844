"""One way to write a file so that readers see the old content or the new, never a half-written one.

:func:`atomic_write` opens a fresh temporary file in the target's folder (``tempfile.mkstemp``:
created exclusively with an unpredictable name, so no planted symlink is followed), lets the
caller write it, flushes and fsyncs it, then ``os.replace``s it onto the target. On any
failure the temporary file is removed and the target is left as it was, and an OSError
(disk full, read-only filesystem, the target is a folder, ...) becomes one
:class:`~dualrs_route.experts.errors.OutputError` naming the target.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Callable, Iterator

from .errors import output_error


@contextlib.contextmanager
def _replacing(path: str | os.PathLike) -> Iterator[tuple[int, str]]:
    """``(fd, name)`` of a fresh temporary file beside ``path``; on a clean exit it gets the usual
    permissions (0666 minus the umask; mkstemp makes 0600) and replaces ``path``, on any
    failure it is removed."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise output_error(path, exc) from exc
    try:
        yield fd, tmp
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(exc, OSError):
            raise output_error(path, exc) from exc
        raise


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb") -> Iterator:
    """``with atomic_write(path, "w") as handle: ...``: the content appears at ``path`` on exit,
    flushed and fsynced. Parent folders are created."""
    with _replacing(path) as (fd, _), os.fdopen(fd, mode) as handle:
        yield handle
        handle.flush()
        os.fsync(handle.fileno())


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_write(path, "w") as handle:
        handle.write(text)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_write(path, "wb") as handle:
        handle.write(data)


def atomic_write_json(path: str | os.PathLike, data, **dumps_options) -> None:
    atomic_write_text(path, json.dumps(data, **({"indent": 2} | dumps_options)) + "\n")


def atomic_write_with(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """For libraries that only write to a file name (safetensors, onnx, torch.onnx.export):
    ``write(tmp_name)`` fills a temporary file beside ``path``, which then replaces it."""
    with _replacing(path) as (fd, tmp):
        os.close(fd)
        write(tmp)
