"""The vLLM internals the plugin wraps or calls, checked when vLLM loads the plugin (``register``).

vLLM keeps these private: a release that renames or re-signs one would leave a wrapper that never runs (a server
that serves unlocked) or that fails mid-request. ``check`` imports each and compares the leading parameters with
the ones the plugin passes; any difference is a ``LockError`` naming the vLLM version and the piece, before the
engine starts. Tested range: ``TESTED`` (pyproject's ``vllm`` extra); to widen it, run ``make test`` on the new
version and update both.
"""

from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass

from safetylock.errors import LockError

TESTED = "vllm>=0.32,<0.33"


@dataclass(frozen=True)
class Internal:
    """One piece of vLLM: ``module``, the dotted ``name`` inside it, and the leading parameters it must take
    (None: it only has to exist)."""

    module: str
    name: str
    parameters: tuple[str, ...] | None = None

    def problem(self) -> str | None:
        """Why this piece does not fit, or None."""
        try:
            found = importlib.import_module(self.module)
        except ImportError as exc:
            return f"module {self.module} cannot be imported ({exc})"
        for part in self.name.split("."):
            found = getattr(found, part, None)
            if found is None:
                return f"{self.module}.{self.name} does not exist"
        if self.parameters is not None:
            have = tuple(inspect.signature(found).parameters)[: len(self.parameters)]
            if have != self.parameters:
                return f"{self.module}.{self.name} takes ({', '.join(have)}), the plugin passes ({', '.join(self.parameters)})"
        return None


LOADER, RUNNER = "vllm.model_executor.model_loader.base_loader", "vllm.v1.worker.gpu_model_runner"
WRAPPED = (
    Internal(LOADER, "BaseModelLoader.load_model", ("self", "vllm_config", "model_config")),
    Internal(RUNNER, "GPUModelRunner._prepare_inputs", ("self", "scheduler_output", "num_scheduled_tokens")),
    Internal(RUNNER, "GPUModelRunner.execute_model", ("self",)),
    Internal(RUNNER, "GPUModelRunner._sample", ("self", "logits", "spec_decode_metadata")),
    Internal("vllm.v1.worker.worker_base", "WorkerBase"),
    Internal("vllm.v1.engine.input_processor", "InputProcessor.__init__", ("self", "vllm_config")),
    Internal("vllm.v1.engine.input_processor", "InputProcessor.process_inputs", ("self", "request_id", "prompt", "params")),
    Internal("vllm.tokenizers.registry", "cached_get_tokenizer"),
    Internal("vllm.entrypoints.launchers.launcher", "terminate_if_errored", ("server", "engine")),
    Internal("vllm.entrypoints.serve.exception_handling.handlers.vllm_error", "terminate_if_errored", ("server", "engine")),
)


def check(internals: tuple[Internal, ...] = WRAPPED) -> None:
    """Raise LockError naming the vLLM version and every piece that does not fit; return when all do."""
    problems = [p for p in (internal.problem() for internal in internals) if p is not None]
    if problems:
        import vllm

        raise LockError(
            f"the safetylock plugin does not fit vLLM {getattr(vllm, '__version__', '?')} (tested: {TESTED}): "
            + "; ".join(problems)
        )
