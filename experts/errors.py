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
