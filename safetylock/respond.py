"""What a gated lock answers a request whose gate fires with: its response policy.

* ``refuse`` (the default of a gated server): the answer is the operator's refusal message, token for token, then
  the tokenizer's end-of-sequence token (repeated if the request ignores it or asks for more tokens; a request's
  ``min_tokens`` holds the answer open on vLLM 0.24, with end-of-sequence repeated, not on 0.32). At every
  sampling step of such a request the logits become the message's next token (log-probability 0, every other
  token −inf) and the sampled token is that token, whatever the request's sampling parameters, structured output
  included (vLLM's scheduler would end such a request as an error when its grammar rejects the message; the plugin
  releases a forced answer from its grammar). Heads are shifted at α-off for every request, as for requests whose
  gate does not fire, so the forced answer's KV cache is the plain model's. A request served at α 0 (per-request
  α, where the operator allows it) is never forced: α 0 turns the lock off for that request under either policy.
* ``steer``: the lock's heads at α-on (semantics: ``safetylock.gate``); the model writes the answer.

Why refuse is the default (docs/gated.md has the tables): where the gate fires, steering answers with whatever the
shifted model says — on attacked models often an empty or broken line ("The Matterhorn is a highly sensitive and
potentially life-threatening situation."), a deflection to another topic, or, on a full fine-tune, nothing that
stops it; the forced refusal is one clean line whatever the fine-tune did to the weights.

The same in the HF path and in the vLLM plugin (forced in the sampler from the decision the gate wrote inside the
graph; the host never reads it back). Under speculative decoding every verified position of such a request is
forced to the message's token there, so a draft is accepted only where it is that token. The HF path needs the
refusal's tokens, so ``apply_gated`` steers unless given them (``apply_gated(..., refusal=refusal_ids(...))``,
then ``GatedHandle.force``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from safetylock.errors import LockError

RESPONSES = ("refuse", "steer")
DEFAULT_RESPONSE = "refuse"
DEFAULT_REFUSAL = "I'm sorry, but I can't help with that."
MAX_MESSAGE_CHARS = 2000


@dataclass(frozen=True)
class ResponsePolicy:
    """How a request whose gate fires is answered (``kind`` one of ``RESPONSES``), and the refusal text."""

    kind: str = DEFAULT_RESPONSE
    message: str = DEFAULT_REFUSAL

    def __post_init__(self) -> None:
        if self.kind not in RESPONSES:
            raise LockError(f"response must be one of {', '.join(RESPONSES)}, got {self.kind!r}")
        if not isinstance(self.message, str) or not self.message.strip():
            raise LockError(f"refusal_message must be a non-empty string, got {self.message!r}")
        if len(self.message) > MAX_MESSAGE_CHARS:
            raise LockError(f"refusal_message has {len(self.message)} characters, at most {MAX_MESSAGE_CHARS} allowed")

    @property
    def refuses(self) -> bool:
        return self.kind == "refuse"

    def summary(self) -> dict[str, str]:
        """For logs and the compile-cache key."""
        return {"response": self.kind, **({"refusal_message": self.message} if self.refuses else {})}


def refusal_ids(tokenizer, message: str) -> list[int]:
    """The tokens a refused request is answered with: ``message`` (no special tokens) then end-of-sequence."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise LockError("the refuse response needs a tokenizer with an end-of-sequence token; this one has none")
    ids = list(tokenizer(message, add_special_tokens=False)["input_ids"])
    if not ids:
        raise LockError(f"refusal_message {message!r} encodes to no tokens")
    return [*ids, int(eos)]


def forced_targets(refusal: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
    """The token each row must produce at output position ``steps`` (the last token, end-of-sequence, past the end)."""
    return refusal[steps.clamp(0, refusal.numel() - 1)]


def is_forced_answer(answer: list[int], refusal: list[int]) -> bool:
    """Whether ``answer`` (a request's output tokens, on the host) is a prefix of the forced answer: the token at
    each position is ``forced_targets``'s there — ``refusal``'s, its last (end-of-sequence) past its end."""
    last = len(refusal) - 1
    return bool(answer) and all(token == refusal[min(i, last)] for i, token in enumerate(answer))


def forced_logits(logits: torch.Tensor, forced: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``logits`` [rows, vocab] with each row where ``forced`` is true replaced by a one-hot on its target
    (0 there, −inf elsewhere); no host synchronisation."""
    one_hot = torch.full_like(logits, float("-inf"))
    one_hot.scatter_(1, targets.to(logits.device, torch.int64)[:, None], 0.0)
    return torch.where(forced.to(logits.device)[:, None], one_hot, logits)
