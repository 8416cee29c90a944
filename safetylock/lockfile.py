"""Stage 3 — the lock file: safetensors tensors + JSON metadata, validated on every load."""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from safetylock.alpha import DEFAULT_ALPHA, check_alpha
from safetylock.data import PromptSet
from safetylock.errors import LockError
from safetylock.gate import READS, Chat, Gate, Pooling, benign_calibration
from safetylock.geometry import HeadGeometry
from safetylock.sources import Request, Sizes, gate_requests, recorded_operator, recorded_sizes

FORMAT = "safetylock.meta-lock"
FORMAT_VERSION = 3  # 2: optional base weight sketch (provenance); 3: optional gate; older files still load
# A lock without a gate is still written as version 2, so its bytes (and fingerprint) stay what they were.
READABLE_VERSIONS = (1, 2, 3)
METADATA_KEY = "safetylock"
TENSOR_NAMES = ("layers", "heads", "directions", "sigmas", "head_accuracy")
SKETCH_TENSOR = "base_sketch"
GATE_TENSOR = "gate_weight"
POOL_TENSORS = ("gate_pool_weight", "gate_pool_query")  # an attention-pooled gate's token score and attention query


@dataclass
class SafetyLock:
    """A Meta-SafetyLock: for each of K heads, a unit safe direction and the σ that scales it."""

    layers: torch.Tensor  # [K] int64
    heads: torch.Tensor  # [K] int64
    directions: torch.Tensor  # [K, head_dim] float32, unit norm
    sigmas: torch.Tensor  # [K] float32, > 0
    head_accuracy: torch.Tensor  # [layers, heads] float32: validation accuracy of every probe
    geometry: HeadGeometry
    default_alpha: float = DEFAULT_ALPHA
    architecture: dict[str, Any] = field(default_factory=dict)
    base_fingerprint: str = ""
    token_policy: dict[str, Any] = field(default_factory=dict)
    provenance: dict[str, Any] = field(default_factory=dict)
    base_sketch: torch.Tensor | None = None  # [layers, probes] float32 (safetylock.provenance); None: unchecked
    sketch_seed: int = 0
    gate: Gate | None = None  # the gated lock's request gate (safetylock.gate); None: always-on only

    def __post_init__(self) -> None:
        validate(self)

    @property
    def num_heads_locked(self) -> int:
        return int(self.layers.numel())

    @property
    def seed(self) -> int:
        """The seed the lock was extracted with (its samples, splits and the gate's data)."""
        return int(self.provenance.get("seed", 0))

    def gate_requests(self, harmful: PromptSet, operator: Sequence[Request] = ()) -> tuple[Request, ...]:
        """The requests this lock's gate was fit on, rebuilt from what the lock records (the gate's data sizes, the
        lock's seed) with ``harmful`` (the questions it was extracted with) and the ``operator``'s requests it was
        fit on (``sources.operator_requests_for`` checks a given file against its record)."""
        return gate_requests(harmful, self._gate_sizes(), seed=self.seed, operator=operator)

    def gate_benign_calibration(self, harmful: PromptSet, operator: Sequence[Request] = ()) -> list[Chat]:
        """The benign calibration requests of ``gate_requests`` as served: what ``calibrate-gate`` sets the
        threshold on."""
        return benign_calibration(harmful, seed=self.seed, sizes=self._gate_sizes(), operator=operator)

    def _gate_sizes(self) -> Sizes:
        """The data sizes the gate records; a lock without a gate is a ``LockError``."""
        if self.gate is None:
            raise LockError("the lock has no gate: extract it without --no-gate")
        return recorded_sizes(self.gate.calibration)

    def metadata(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION if self.gate is not None else 2,  # a lock's bytes never change
            "geometry": self.geometry.to_dict(),
            "architecture": self.architecture,
            "base_fingerprint": self.base_fingerprint,
            "default_alpha": self.default_alpha,
            "token_policy": self.token_policy,
            "provenance": self.provenance,
            **({} if self.base_sketch is None else {"sketch": {"module": "o_proj", "seed": self.sketch_seed}}),
            **({} if self.gate is None else {"gate": self.gate.to_metadata()}),
        }

    def to_bytes(self) -> bytes:
        """Canonical serialization: the same lock always gives the same bytes."""
        tensors = {name: getattr(self, name).contiguous() for name in TENSOR_NAMES}
        if self.base_sketch is not None:
            tensors[SKETCH_TENSOR] = self.base_sketch.contiguous()
        if self.gate is not None:
            tensors[GATE_TENSOR] = self.gate.weight.contiguous()
            if self.gate.pooling is not None:
                pooled = (self.gate.pooling.weight, self.gate.pooling.query)
                tensors |= {name: t.contiguous() for name, t in zip(POOL_TENSORS, pooled)}
        return save_tensors(tensors, metadata={METADATA_KEY: json.dumps(self.metadata(), sort_keys=True)})

    @property
    def fingerprint(self) -> str:
        """Short content hash that names this lock in logs, metrics and vLLM's compile-cache key."""
        return hashlib.sha256(self.to_bytes()).hexdigest()[:16]

    def save(self, path: str | Path) -> Path:
        """Write atomically: a reader never sees a half-written lock, and a failed write (disk full, file size
        limit) leaves nothing behind and raises LockError naming the file."""
        path = Path(path)
        data = self.to_bytes()
        tmp = None
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, path)
        except BaseException as exc:
            if tmp is not None:
                Path(tmp).unlink(missing_ok=True)
            if isinstance(exc, OSError):
                raise LockError(f"cannot write lock file {path}: {exc.strerror or exc}") from None
            raise
        return path

    def check_geometry(self, model_geometry: HeadGeometry) -> None:
        """Refuse a model whose attention geometry differs from the base the lock was extracted on."""
        problem = self.geometry.mismatch(model_geometry)
        if problem:
            raise LockError(f"lock does not fit this model: {problem}")


def validate(lock: SafetyLock) -> None:
    """Raise LockError naming the first problem: shapes, index ranges, duplicates, finiteness, norms."""
    geo = lock.geometry
    k = lock.layers.shape[0] if lock.layers.dim() == 1 else -1
    expected = {
        "layers": ((k,), torch.int64),
        "heads": ((k,), torch.int64),
        "directions": ((k, geo.head_dim), torch.float32),
        "sigmas": ((k,), torch.float32),
        "head_accuracy": ((geo.num_layers, geo.num_heads), torch.float32),
    }
    if k <= 0:
        raise LockError("lock holds no heads (tensor 'layers' must be a non-empty vector)")
    for name, (shape, dtype) in expected.items():
        tensor = getattr(lock, name)
        if tuple(tensor.shape) != shape or tensor.dtype != dtype:
            raise LockError(
                f"tensor {name!r} is {tensor.dtype} {tuple(tensor.shape)}, expected {dtype} {shape} "
                f"for {k} heads of head_dim {geo.head_dim}"
            )
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise LockError(f"tensor {name!r} holds non-finite values (NaN or inf)")
    sketch = lock.base_sketch
    if sketch is not None:
        if sketch.dtype != torch.float32 or sketch.dim() != 2 or sketch.shape[0] != geo.num_layers or sketch.shape[1] < 2:
            raise LockError(
                f"tensor {SKETCH_TENSOR!r} is {sketch.dtype} {tuple(sketch.shape)}, "
                f"expected float32 ({geo.num_layers}, probes >= 2)"
            )
        if not torch.isfinite(sketch).all():
            raise LockError(f"tensor {SKETCH_TENSOR!r} holds non-finite values (NaN or inf)")
    if lock.gate is not None:
        validate_gate(lock.gate, geo, lock.layers.tolist())
    if lock.layers.min() < 0 or lock.layers.max() >= geo.num_layers:
        raise LockError(f"layer index out of range 0..{geo.num_layers - 1}: {lock.layers.tolist()}")
    if lock.heads.min() < 0 or lock.heads.max() >= geo.num_heads:
        raise LockError(f"head index out of range 0..{geo.num_heads - 1}: {lock.heads.tolist()}")
    pairs = list(zip(lock.layers.tolist(), lock.heads.tolist()))
    if len(set(pairs)) != len(pairs):
        raise LockError("lock lists the same (layer, head) more than once")
    if (lock.sigmas <= 0).any():
        raise LockError("every sigma must be positive")
    norms = lock.directions.norm(dim=1)
    if not torch.allclose(norms, torch.ones_like(norms), atol=1e-4):
        raise LockError(f"directions must have unit norm (found norms {norms.min():.4g}..{norms.max():.4g})")
    check_alpha(lock.default_alpha, "default_alpha")


def validate_gate(gate: Gate, geo: HeadGeometry, lock_layers: list[int]) -> None:
    pooled = () if gate.pooling is None else zip(POOL_TENSORS, (gate.pooling.weight, gate.pooling.query))
    for name, weight in ((GATE_TENSOR, gate.weight), *pooled):
        if weight.dtype != torch.float32 or tuple(weight.shape) != (geo.hidden_size,):
            raise LockError(f"tensor {name!r} is {weight.dtype} {tuple(weight.shape)}, expected float32 ({geo.hidden_size},)")
        if not torch.isfinite(weight).all():
            raise LockError(f"tensor {name!r} holds non-finite values (NaN or inf)")
    if not 0 <= gate.layer < geo.num_layers:
        raise LockError(f"gate layer {gate.layer} out of range 0..{geo.num_layers - 1}")
    if not all(math.isfinite(v) for v in (gate.bias, gate.threshold)):
        raise LockError("gate bias and threshold must be finite numbers")
    if not any(gate.shifts_when_generating(layer) for layer in lock_layers):
        raise LockError(f"no locked head lies after the gate layer {gate.layer}: a gated lock would shift nothing")
    recorded_sizes(gate.calibration)  # the data its calibration is rebuilt from (calibrate-gate)
    recorded_operator(gate.calibration)  # and the operator's requests among them


def _gate(meta: dict[str, Any], tensors: dict[str, torch.Tensor], source: str) -> Gate | None:
    """The gate stored in a lock file, if any (its metadata and its tensor come together)."""
    info = meta.get("gate")
    if info is None and GATE_TENSOR not in tensors:
        if any(name in tensors for name in POOL_TENSORS):
            raise LockError(f"{source}: tensors {list(POOL_TENSORS)} without a gate")
        return None
    if info is None or GATE_TENSOR not in tensors:
        raise LockError(f"{source}: gate metadata and tensor {GATE_TENSOR!r} must come together")
    read = info.get("read", "last")
    if read not in READS:
        raise LockError(f"{source}: gate read must be one of {', '.join(READS)}, got {read!r}")
    present = [name for name in POOL_TENSORS if name in tensors]
    if (read == "attention") != bool(present) or 0 < len(present) < len(POOL_TENSORS):
        raise LockError(f"{source}: a gate with read 'attention' and tensors {list(POOL_TENSORS)} must come together")
    try:
        pooling = None
        if read == "attention":
            system = info.get("pooling") or {}
            head, end = (tuple(int(i) for i in system.get(key) or ()) for key in ("system_head", "system_end"))
            pooling = Pooling(*(tensors[name] for name in POOL_TENSORS), head, end)
        return Gate(
            int(info["layer"]),
            tensors[GATE_TENSOR],
            float(info["bias"]),
            float(info["threshold"]),
            dict(info.get("calibration") or {}),
            str(info.get("early_heads", "never")),  # absent: written before early heads were shifted
            pooling,
        )
    except (KeyError, TypeError, ValueError):
        raise LockError(
            f"{source}: gate metadata needs integer 'layer', numeric 'bias' and 'threshold' (and integer token ids "
            "under 'pooling')"
        ) from None


def from_bytes(data: bytes, source: str = "<bytes>") -> SafetyLock:
    try:
        tensors = load_tensors(data)
    except Exception as exc:  # the Rust parser raises several exception types
        raise LockError(f"{source}: not a readable safetensors lock file ({exc})") from None
    try:
        header_len = int.from_bytes(data[:8], "little")
        header = json.loads(data[8 : 8 + header_len])
        meta = json.loads(header["__metadata__"][METADATA_KEY])
    except (KeyError, TypeError, ValueError):
        raise LockError(f"{source}: no safetylock metadata in the safetensors header") from None
    if meta.get("format") != FORMAT:
        raise LockError(f"{source}: not a SafetyLock file (format {meta.get('format')!r})")
    if meta.get("format_version") not in READABLE_VERSIONS:
        raise LockError(
            f"{source}: unsupported lock format version {meta.get('format_version')!r} "
            f"(this safetylock reads versions {', '.join(map(str, READABLE_VERSIONS))})"
        )
    missing = [name for name in TENSOR_NAMES if name not in tensors]
    if missing:
        raise LockError(f"{source}: missing tensors {missing}")
    try:
        geometry = HeadGeometry.from_dict(meta.get("geometry") or {})
        return SafetyLock(
            **{name: tensors[name] for name in TENSOR_NAMES},
            geometry=geometry,
            default_alpha=meta.get("default_alpha", DEFAULT_ALPHA),
            architecture=meta.get("architecture", {}),
            base_fingerprint=meta.get("base_fingerprint", ""),
            token_policy=meta.get("token_policy", {}),
            provenance=meta.get("provenance", {}),
            base_sketch=tensors.get(SKETCH_TENSOR),
            sketch_seed=int((meta.get("sketch") or {}).get("seed", 0)),
            gate=_gate(meta, tensors, source),
        )
    except (ValueError, TypeError) as exc:  # LockError and GeometryError are ValueErrors
        raise LockError(f"{source}: {exc}") from None


def load(path: str | Path) -> SafetyLock:
    """Read and validate a lock file; any problem raises one LockError naming the file and the fault."""
    path = Path(path)
    if not path.is_file():
        raise LockError(f"lock file {path} does not exist")
    return from_bytes(path.read_bytes(), str(path))


def from_probes(result, geometry: HeadGeometry, **meta: Any) -> SafetyLock:
    """Build a lock from a ProbeResult (see safetylock.probe)."""
    return SafetyLock(
        layers=torch.from_numpy(np.asarray(result.layers, dtype=np.int64)),
        heads=torch.from_numpy(np.asarray(result.heads, dtype=np.int64)),
        directions=torch.from_numpy(np.asarray(result.directions, dtype=np.float32)),
        sigmas=torch.from_numpy(np.asarray(result.sigmas, dtype=np.float32)),
        head_accuracy=torch.from_numpy(np.asarray(result.accuracy, dtype=np.float32)),
        geometry=geometry,
        **meta,
    )
