"""API-server side: each request's α under the operator's policy, the prefix-cache salt, Prometheus metrics
(including the gate's decision counts, ``gatecount``).

Wraps vLLM's ``InputProcessor`` (used by the OpenAI server and by ``vllm.LLM`` alike). A request's
``vllm_xargs.safetylock_alpha`` is checked against the policy; a refused value raises vLLM's own validation
error, which the server answers with HTTP 400 while it keeps serving. In dynamic mode the resolved α is written
into the request (the worker reads only that) and into its ``cache_salt``, so KV blocks computed under one α
never serve another; under an attention-pooled gate only the system turn may come from the prefix cache (the gate
reads the forward of every prompt token after it: ``engine``, ``cache``). A gated server refuses (400) prompts that
pre-fill an assistant turn unless the operator allows them (``allow_prefill``); every server with the plugin refuses
(400) a request that sets the plugin's own prefix-cache limit (``CACHE_READS_KEY``), which only this side writes.
"""

from __future__ import annotations

import atexit
import functools
import inspect
import os
import sys
from dataclasses import dataclass

from safetylock.alpha import REQUEST_ALPHA_KEY, RequestAlphaError
from safetylock.gate import continues_assistant_turn
from safetylock.serve.config import PINNED_KEY, PreparedLock, prepare, serve_config
from safetylock_vllm import gatecount, internals
from safetylock_vllm.cache import CACHE_READS_KEY
from safetylock_vllm.gatecount import GateCollector, GateCounts
from safetylock_vllm.state import STATE


class Metrics:
    """The plugin's Prometheus series, created once per process in vLLM's registry."""

    def __init__(self) -> None:
        from prometheus_client import Counter, Gauge

        self.info = Gauge("safetylock_lock_info", "The served SafetyLock (value 1)", ["fingerprint", "lock", "mode"])
        self.default_alpha = Gauge("safetylock_default_alpha", "The alpha of requests that do not set their own")
        self.requests = Counter(
            "safetylock_requests",
            "Requests admitted, by the alpha they are served with (an operator's alpha), or 'client' (a request's own)",
            ["alpha"],
        )
        self.refused = Counter("safetylock_refused_alpha_requests", "Requests refused for their safetylock_alpha")
        self.gate: GateCollector | None = None
        self._labels: tuple[str, str, str] | None = None

    def show(self, prepared: PreparedLock) -> None:
        labels = (prepared.lock.fingerprint, prepared.config.lock.name, prepared.config.mode)
        if self._labels is not None and self._labels != labels:
            self.info.remove(*self._labels)
        self.info.labels(*labels).set(1)
        self._labels = labels
        self.default_alpha.set(prepared.alpha)

    def watch_gate(self, counts: GateCounts) -> None:
        """Export ``counts`` (the engine this process starts next) as the gate's decision counters."""
        from prometheus_client import REGISTRY

        if self.gate is None:
            self.gate = GateCollector(counts)
            REGISTRY.register(self.gate)
        self.gate.counts = counts


def metrics() -> Metrics:
    """This process's series, created on first use."""
    if STATE.metrics is None:
        STATE.metrics = Metrics()
    return STATE.metrics


@dataclass
class FrontendLock:
    """What this process knows of the served lock: enough to resolve each request's α, and the chat's
    generation prompt (``hf.generation_header``) that a gated server's prompts must end with."""

    prepared: PreparedLock
    header: tuple[int, ...] = ()
    external_kv: bool = False  # a KV connector serves cached tokens too (``kv_transfer_config``)

    def alpha_label(self, alpha: float) -> str:
        """The metrics label of a request served at ``alpha``: the value when the operator set it (the server's or
        an adapter's α), else ``client`` — clients choose among unboundedly many values, label series must not."""
        operator = {self.prepared.alpha, *self.prepared.config.policy.adapter_alpha.values()}
        return f"{alpha:g}" if alpha in operator else "client"

    def prompt_refusal(self, prompt_ids) -> str | None:
        """Gated, unless ``allow_prefill``: why a prompt that pre-fills an assistant turn is refused (its gate would
        read a token it was not fit on; measured: harmful requests pre-filled with "Sure, here is" slip past it);
        None for any other prompt."""
        config = self.prepared.config
        if config.gated and not config.allow_prefill and continues_assistant_turn(prompt_ids or (), self.header):
            return (
                "this gated server does not continue a pre-filled assistant turn (continue_final_message, or a "
                "prompt that does not end with the assistant's generation prompt): its gate decides on that token"
            )
        return None

    def cache_reads(self, prompt_ids) -> int | None:
        """How many leading tokens of a prompt vLLM may serve from its prefix cache: under an attention-pooled gate
        those before its pooled read (the system turn; ``cache``), every one (None) otherwise."""
        if not self.prepared.config.gated or self.prepared.lock.gate.pooling is None:
            return None
        return self.prepared.lock.gate.pooling.start(list(prompt_ids or ()))

    def resolve(self, params, lora_request) -> float:
        requested = (params.extra_args or {}).get(REQUEST_ALPHA_KEY)
        adapter = getattr(lora_request, "lora_name", None)
        return self.prepared.config.policy.resolve(self.prepared.alpha, requested, adapter)

    def replace(self, prepared: PreparedLock) -> None:
        self.prepared = prepared
        metrics().show(prepared)


ENGINE_DIED_EXIT_CODE = 70  # EX_SOFTWARE: the server stopped because its engine died, not on request


def watch_engine_death() -> None:
    """Make a server whose engine died exit non-zero (vLLM stops serving then, but exits 0, which an
    orchestrator reads as a clean stop). vLLM decides to stop in ``terminate_if_errored`` (its watchdog and its
    request error handler); the wrapper notes when that call, not a shutdown already under way, stops the
    server, and an exit handler registered before vLLM's (so run after them) exits with
    ``ENGINE_DIED_EXIT_CODE``."""
    import importlib

    modules = [importlib.import_module(name) for name in internals.engine_death_sites()]
    original = modules[0].terminate_if_errored
    if getattr(original, "_safetylock_wrapped", False):
        return

    @functools.wraps(original)
    def terminate_if_errored(server, engine):
        stopping = server.should_exit
        original(server=server, engine=engine)
        if server.should_exit and not stopping:
            STATE.engine_died = True

    def exit_code() -> None:
        if STATE.engine_died:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(ENGINE_DIED_EXIT_CODE)

    terminate_if_errored._safetylock_wrapped = True
    for module in modules:
        module.terminate_if_errored = terminate_if_errored
    atexit.register(exit_code)


def install() -> None:
    """Wrap ``InputProcessor.__init__`` (load and check the lock) and ``process_inputs`` (policy, salt, count);
    watch for the engine's death (``watch_engine_death``)."""
    from vllm.v1.engine.input_processor import InputProcessor

    watch_engine_death()

    if getattr(InputProcessor.process_inputs, "_safetylock_wrapped", False):
        return
    init, process = InputProcessor.__init__, InputProcessor.process_inputs
    signature = inspect.signature(process)

    @functools.wraps(init)
    def locked_init(self, vllm_config, *args, **kwargs):
        init(self, vllm_config, *args, **kwargs)
        config = serve_config(vllm_config.additional_config)
        if config is None:
            return
        if config.hot_swap:
            internals.check_hot_swap()
        from safetylock.geometry import head_geometry
        from safetylock.hf import generation_header

        prepared = prepare(config, head_geometry(vllm_config.model_config.hf_config))
        tokenizer = self.tokenizer if config.gated else None
        header = tuple(generation_header(tokenizer)) if tokenizer is not None else ()
        STATE.frontend = FrontendLock(prepared, header, getattr(vllm_config, "kv_transfer_config", None) is not None)
        # before the engine starts: its workers must load this very lock (``check_pinned``)
        vllm_config.additional_config[PINNED_KEY] = STATE.frontend.prepared.lock.fingerprint
        metrics().show(STATE.frontend.prepared)
        if config.gated:  # before the engine starts: its processes inherit where to count
            counts = GateCounts.create()
            os.environ[gatecount.ENV] = str(counts.path)
            metrics().watch_gate(counts)

    @functools.wraps(process)
    def locked_process_inputs(self, *args, **kwargs):
        from vllm.exceptions import VLLMValidationError
        from vllm.sampling_params import SamplingParams

        bound = signature.bind(self, *args, **kwargs).arguments
        params = bound["params"]
        if isinstance(params, SamplingParams) and CACHE_READS_KEY in (params.extra_args or {}):
            # the scheduler trusts this key (``cache``): only this wrapper writes it, on every server with the plugin
            raise VLLMValidationError(
                f"vllm_xargs.{CACHE_READS_KEY} is set by the server, not by requests", parameter=f"vllm_xargs.{CACHE_READS_KEY}"
            )
        state = STATE.frontend
        if state is None or not isinstance(params, SamplingParams):  # no safetylock configuration: straight through
            return process(self, *args, **kwargs)
        try:
            alpha = state.resolve(params, bound.get("lora_request"))
        except RequestAlphaError as exc:
            metrics().refused.inc()
            raise VLLMValidationError(str(exc), parameter=f"vllm_xargs.{REQUEST_ALPHA_KEY}") from None
        request = process(self, *args, **kwargs)
        refusal = state.prompt_refusal(request.prompt_token_ids)
        if refusal is not None:
            raise VLLMValidationError(refusal, parameter="messages")
        if state.prepared.config.dynamic:
            sampling = request.sampling_params
            sampling.extra_args = {**(sampling.extra_args or {}), REQUEST_ALPHA_KEY: alpha}
            readable = state.cache_reads(request.prompt_token_ids)
            if readable is not None:  # the pooled read needs every token after the system turn forwarded
                sampling.extra_args[CACHE_READS_KEY] = readable
                if state.external_kv and hasattr(sampling, "skip_reading_prefix_cache"):
                    sampling.skip_reading_prefix_cache = True  # a KV connector's hits are not cut: read none
            salt = state.prepared.cache_salt(alpha)
            request.cache_salt = salt if not request.cache_salt else f"{salt}|{request.cache_salt}"
        metrics().requests.labels(state.alpha_label(alpha)).inc()
        return request

    locked_process_inputs._safetylock_wrapped = True
    InputProcessor.__init__ = locked_init
    InputProcessor.process_inputs = locked_process_inputs
