"""SafetyLock: extract a Meta-SafetyLock from an aligned base model and lock its fine-tuned variants."""

from safetylock.apply import LockHandle, apply, fold_bias, layer_shifts
from safetylock.geometry import GeometryError, HeadGeometry, head_geometry
from safetylock.lockfile import LockError, SafetyLock, load

__all__ = [
    "GeometryError",
    "HeadGeometry",
    "LockError",
    "LockHandle",
    "SafetyLock",
    "apply",
    "fold_bias",
    "head_geometry",
    "layer_shifts",
    "load",
]
