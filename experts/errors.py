"""Typed errors. Each message says what was asked, what exists, and how to fix it.

The CLI turns every :class:`DualRSError` into a one-line message and exit code 1
(2 for bad command-line values), never a traceback.
"""

from __future__ import annotations


class DualRSError(Exception):
    """Base class of every error this package raises on purpose."""


class ModelNotFoundError(DualRSError):
    """A model reference resolves to nothing (missing folder, Hub repo not cached or not found)."""


class ModelFormatError(DualRSError):
    """A model folder exists but its config or weights are unreadable, corrupt or inconsistent."""


class IncompatibleModelsError(DualRSError):
    """A router and its experts (or several experts) do not fit together."""


class DataError(DualRSError):
    """The input data is missing, malformed, or does not fit the model."""


class EngineUnavailableError(DualRSError):
    """A requested engine, device or execution provider is not installed or not usable here."""


class ResumeMismatchError(DualRSError):
    """An existing results file was written with different settings than the ones requested."""


class ExportMismatchError(DualRSError):
    """An exported model disagrees with its source beyond tolerance; lists every mismatch."""

    def __init__(self, message: str, mismatches: list[str] | None = None):
        self.mismatches = list(mismatches or [])
        if self.mismatches:
            message = message + "\n  " + "\n  ".join(self.mismatches)
        super().__init__(message)


class NonFiniteOutputError(DualRSError):
    """The network returned NaN or infinite logits on a noisy input. Such a sample is not a vote
    for any class (an argmax would send it to class 0), and dropping it would bias the estimate,
    so certification of that input stops with this error and no row is written for it."""


class OutputError(DualRSError):
    """Writing an output (results rows, a sidecar, a plot, a model folder) failed at the OS level.

    The message names the path and says what to do; rows already written stay as they are."""


class LockedError(DualRSError):
    """Another process is writing the same results file (it holds the file's lock)."""


_OUTPUT_ADVICE = {
    "ENOSPC": "the disk is full: free space (or choose another location) and re-run",
    "EDQUOT": "the disk quota is exceeded: free space (or choose another location) and re-run",
    "EROFS": "the filesystem is read-only: choose a location on a writable disk",
    "EACCES": "permission denied: choose a location you may write to, or fix its permissions",
    "EPERM": "permission denied: choose a location you may write to, or fix its permissions",
    "EISDIR": "it is a folder: give a file name, or move the folder away",
    "ENOTDIR": "a part of the path is a file, not a folder: choose another location",
    "ELOOP": "it is a symbolic link, which is never followed: remove it",
}


def output_error(path, exc: OSError, *, kept: str = "") -> OutputError:
    """One-line :class:`OutputError` for ``exc`` raised while writing ``path``: the path, the OS's
    reason and what to do (``kept`` adds what is still intact, e.g. "rows already written are kept")."""
    import errno

    name = errno.errorcode.get(exc.errno or 0, "")
    advice = _OUTPUT_ADVICE.get(name, "check the path and the disk, then re-run")
    reason = exc.strerror or str(exc) or type(exc).__name__
    return OutputError(f"cannot write {path}: {reason}; {advice}" + (f" ({kept})" if kept else ""))
