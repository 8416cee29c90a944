"""SafetyLock: extract a Meta-SafetyLock from an aligned base model and lock its fine-tuned variants."""

from safetylock.apply import GatedHandle, LockHandle, apply, apply_gated, fold_bias, layer_shifts
from safetylock.gate import Gate
from safetylock.geometry import GeometryError, HeadGeometry, head_geometry
from safetylock.lockfile import LockError, SafetyLock, load

__all__ = [
    "Gate",
    "GatedHandle",
    "GeometryError",
    "HeadGeometry",
    "LockError",
    "LockHandle",
    "SafetyLock",
    "apply",
    "apply_gated",
    "fold_bias",
    "head_geometry",
    "layer_shifts",
    "load",
]
