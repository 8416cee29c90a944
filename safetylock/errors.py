"""The library's error types: every problem with what a user gave is a ``SafetylockError`` with a one-line message."""

from __future__ import annotations


class SafetylockError(ValueError):
    """Bad input (a file, an option, a model that does not fit): the CLI prints the message, no traceback."""


class LockError(SafetylockError):
    """A lock file is malformed, or cannot be applied to a model."""


class GeometryError(SafetylockError):
    """A model's attention geometry is missing, unsupported or does not match."""


class DataError(SafetylockError):
    """A prompt or evaluation file cannot be read."""


class ModelError(SafetylockError):
    """A packaged model cannot be fetched or converted, or a model directory is unusable."""


class AdapterError(SafetylockError):
    """A LoRA adapter directory is unreadable or does not fit the others."""


class ExtractError(SafetylockError):
    """Extraction options that the data or the model cannot satisfy."""
