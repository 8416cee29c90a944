"""The vLLM internals the plugin wraps or calls, checked when vLLM loads the plugin (``register``).

vLLM keeps these private: a release that renames or re-signs one would leave a wrapper that never runs (a server
that serves unlocked) or that fails mid-request. ``check`` imports each and compares the leading parameters with
the ones the plugin passes; any difference is a ``LockError`` naming the vLLM version and the piece, before the
engine starts. Tested releases: ``TESTED`` (CI: 0.32 through ``make test``, 0.24, the GPU image's, through
``make test-vllm-compat``); to add one, run both on it and update ``TESTED``.

Where a piece moved between tested releases, ``ENGINE_DEATH_LAYOUTS`` lists each place it has lived; the first whose
modules import is the one wrapped and checked. Hot swap needs endpoint plugins, which 0.24 lacks (``check_hot_swap``).
"""

from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass

from safetylock.errors import LockError

TESTED = ("0.24", "0.32")  # vLLM releases the real-engine tests pass on


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
    Internal("vllm.v1.core.kv_cache_manager", "KVCacheManager.get_computed_blocks", ("self", "request")),
    Internal("vllm.v1.core.sched.scheduler", "Scheduler.schedule", ("self",)),
    Internal(
        "vllm.v1.core.sched.scheduler", "Scheduler.update_from_output", ("self", "scheduler_output", "model_runner_output")
    ),
    Internal("vllm.v1.structured_output.request", "StructuredOutputRequest.grammar"),
    Internal(
        "vllm.v1.core.block_pool",
        "BlockPool.cache_full_blocks",
        ("self", "request", "blocks", "num_cached_blocks", "num_full_blocks", "block_size"),
    ),
)

# Where vLLM keeps ``terminate_if_errored`` (it stops a server whose engine died): the module that defines it, then
# each module that imports it by name and so holds its own reference. Newest release first.
ENGINE_DEATH_LAYOUTS = (
    ("vllm.entrypoints.launchers.launcher", "vllm.entrypoints.serve.exception_handling.handlers.vllm_error"),  # 0.32
    ("vllm.entrypoints.launcher", "vllm.entrypoints.serve.utils.server_utils"),  # 0.24
)


def engine_death_sites() -> tuple[str, ...]:
    """The modules whose ``terminate_if_errored`` the plugin wraps: the first layout whose defining module
    imports (the newest when none does, so that ``check`` names what is missing)."""
    for layout in ENGINE_DEATH_LAYOUTS:
        try:
            importlib.import_module(layout[0])
        except ImportError:
            continue
        return layout
    return ENGINE_DEATH_LAYOUTS[0]


def wrapped() -> tuple[Internal, ...]:
    """Every piece the plugin wraps or calls in the installed vLLM."""
    return WRAPPED + tuple(Internal(m, "terminate_if_errored", ("server", "engine")) for m in engine_death_sites())


# Hot swap is served by the ``safetylock_admin`` endpoint plugin; vLLM 0.24 loads no endpoint plugins.
ENDPOINT_PLUGINS = Internal("vllm.plugins.endpoint_plugins.interface", "attach_endpoint_plugins")


def check_hot_swap(endpoint_plugins: Internal = ENDPOINT_PLUGINS) -> None:
    """Raise LockError when hot swap is asked for (an admin token is set) but this vLLM cannot serve its routes: a
    server whose operator expects to swap never starts without the means to."""
    problem = endpoint_plugins.problem()
    if problem is not None:
        import vllm

        raise LockError(
            f"hot swap (SAFETYLOCK_ADMIN_TOKEN is set) needs vLLM's endpoint plugins, which vLLM "
            f"{getattr(vllm, '__version__', '?')} lacks ({problem}): unset the token or serve with vLLM 0.32"
        )


def check(internals: tuple[Internal, ...] | None = None) -> None:
    """Raise LockError naming the vLLM version and every piece that does not fit; return when all do."""
    problems = [p for p in (internal.problem() for internal in internals or wrapped()) if p is not None]
    if problems:
        import vllm

        raise LockError(
            f"the safetylock plugin does not fit vLLM {getattr(vllm, '__version__', '?')} (tested: {', '.join(TESTED)}): "
            + "; ".join(problems)
        )
