"""Scheduler side: a structured-output request whose answer the refuse response forced leaves its grammar.

Under the ``refuse`` response the sampler forces a fired request's answer to the operator's message (``engine``),
whatever the request asked for — a JSON schema, a regex or a choice included. vLLM's scheduler then advances the
request's grammar with the tokens it was given, and a grammar that rejects one ends the request as an error: the
client got HTTP 500 instead of the refusal (vLLM 0.32 and 0.24 alike). Before the scheduler applies a step's
output (``Scheduler.update_from_output``), a structured-output request whose answer so far is the refusal's
tokens (the message, then end-of-sequence repeated) and whose grammar rejects this step's tokens is *released*:
its grammar becomes ``Released``, which accepts every token and masks none, so the request ends as any forced
request does (``finish_reason`` "stop", the message as its text).

The scheduler never learns the gate's decision (it stays on the device): the forced tokens are the evidence. A
grammar only rejects a token the sampler was not allowed to pick, so an answer the model wrote under its grammar is
never released — one that happens to begin like the message included, since its grammar accepts it.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from safetylock.respond import is_forced_answer
from safetylock.serve.config import serve_config


class Released:
    """The grammar of a request whose answer is forced: accepts every token, masks none, never terminates (the
    forced end-of-sequence ends the request). Duck-types vLLM's ``StructuredOutputGrammar``."""

    def accept_tokens(self, request_id: str, tokens: list[int]) -> bool:
        return True

    def validate_tokens(self, tokens: list[int]) -> list[int]:
        return list(tokens)

    def rollback(self, num_tokens: int) -> None:
        pass

    def fill_bitmask(self, bitmask, batch_index: int) -> None:
        bitmask[batch_index].fill_(-1)  # every bit set: every token allowed

    def is_terminated(self) -> bool:
        return False

    def reset(self) -> None:
        pass


@dataclass
class Forced:
    """The refusal's tokens of the scheduler's server (None: not a gated server under the refuse response), read
    once per scheduler."""

    refusal: list[int] | None = None
    config: object = None

    def open(self, scheduler) -> None:
        config = getattr(scheduler, "vllm_config", None)
        if config is self.config:
            return
        self.config, self.refusal = config, None
        served = serve_config(getattr(config, "additional_config", None))
        if served is not None and served.gated and served.response.refuses:
            from safetylock_vllm.engine import refusal_tokens

            self.refusal = refusal_tokens(served.response.message, config).tolist()

    def release(self, scheduler, scheduled, output) -> None:
        """Release each structured-output request of ``output`` (a ``ModelRunnerOutput``) whose answer, with this
        step's tokens, is the forced answer and whose grammar rejects them. ``scheduled`` (the step's
        ``SchedulerOutput``) says whether any request sampled under a grammar; none did on most steps."""
        if not getattr(scheduled, "has_structured_output_requests", True):
            return
        self.open(scheduler)
        if self.refusal is None:
            return
        for request_id, index in output.req_id_to_index.items():
            request = scheduler.requests.get(request_id)
            structured = getattr(request, "structured_output_request", None)
            if structured is None or index >= len(output.sampled_token_ids):
                continue
            new = [int(token) for token in output.sampled_token_ids[index]]
            grammar = structured.grammar
            if not new or grammar is None or isinstance(grammar, (Released, Exception)):
                continue
            if is_forced_answer([*request.output_token_ids, *new], self.refusal) and grammar.validate_tokens(new) != new:
                structured.grammar = Released()
                _log_release(request_id)


FORCED = Forced()


def _log_release(request_id: str) -> None:
    from vllm.logger import init_logger

    init_logger("vllm.safetylock").info("request %s: refusal forced, released from its structured-output grammar", request_id)


def install() -> None:
    """Wrap ``Scheduler.update_from_output`` (once per process)."""
    from vllm.v1.core.sched.scheduler import Scheduler

    original = Scheduler.update_from_output
    if getattr(original, "_safetylock_wrapped", False):
        return

    @functools.wraps(original)
    def update_from_output(self, scheduler_output, model_runner_output, *args, **kwargs):
        FORCED.release(self, scheduler_output, model_runner_output)
        return original(self, scheduler_output, model_runner_output, *args, **kwargs)

    update_from_output._safetylock_wrapped = True
    Scheduler.update_from_output = update_from_output
