"""The ``safetylock`` command line: one module per group of verbs, the shared options in ``common``."""

from safetylock.cli import lab, locks, serving  # noqa: F401  (importing them registers their commands)
from safetylock.cli.common import main

__all__ = ["main"]
