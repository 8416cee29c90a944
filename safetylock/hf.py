"""HF transformers helpers every layer above uses: load a local model, render a chat, generate greedily.

The bottom of the package: it imports nothing from ``safetylock`` but its error types.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from safetylock.errors import ExtractError

Turns = tuple[tuple[str, str], ...]  # (role, content) chat turns
Prompt = str | Turns  # one user turn, or a conversation ending with the user's turn
Generator = Callable[[Sequence[Prompt], int], list[str]]  # prompts, max tokens -> answers (HF, vLLM or a server)
PRECISIONS = ("auto", "float32", "bfloat16")  # of the forwards that extraction records activations from


def forward_precision(requested: str = "auto") -> str:
    """The precision extraction's forwards run in (the head capture and the gate's features; what they record is
    float32 either way): ``auto`` is bfloat16 where the CPU multiplies it natively (AMX or AVX-512 BF16; three times
    faster than float32 on an AMX host; the same heads, directions at cosine 0.99996, σ within 0.5%, gate decisions
    equal on 99% of the gate's requests) and float32 elsewhere, where bfloat16 is emulated and slower."""
    if requested not in PRECISIONS:
        raise ExtractError(f"precision must be one of {', '.join(PRECISIONS)}, got {requested!r}")
    if requested != "auto":
        return requested
    native = [getattr(torch.cpu, name, lambda: False) for name in ("_is_amx_tile_supported", "_is_avx512_bf16_supported")]
    return "bfloat16" if any(check() for check in native) else "float32"


def autocast(model: torch.nn.Module, precision: str) -> torch.autocast:
    """A forward of ``model`` in ``precision`` (``forward_precision``; float32 leaves it as it is). Enter it once
    around all batches: autocast casts each weight once per entry."""
    device = next(model.parameters()).device.type
    return torch.autocast(device, dtype=torch.bfloat16, enabled=forward_precision(precision) == "bfloat16")


def pad_batch(sequences: Sequence[list[int]], pad_id: int, side: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad to a rectangle on ``side`` ('left' or 'right'); returns (input_ids, attention_mask)."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        span = slice(width - len(seq), width) if side == "left" else slice(0, len(seq))
        ids[row, span] = torch.tensor(seq, dtype=torch.long)
        mask[row, span] = 1
    return ids, mask


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading tokens ``a`` and ``b`` share."""
    n = min(len(a), len(b))
    return next((i for i in range(n) if a[i] != b[i]), n)


@dataclass(frozen=True)
class PrefixRun:
    """Sequences (indices) forwarded together after their shared first ``prefix`` tokens, forwarded once."""

    prefix: int
    members: list[int]


def prefix_runs(sequences: Sequence[Sequence[int]], run_cost: int = 64, window: int = 512) -> list[PrefixRun]:
    """``sequences`` cut into runs that share a prefix, chosen to forward the fewest tokens: sorted, a run of
    neighbours costs its shared prefix once, each member's remainder, and ``run_cost`` tokens (the overhead of one
    more forward); a run's prefix leaves each member at least its last token. Runs of at most ``window`` members.
    On the gate's 1,797 requests: 66% of their tokens forwarded, 51 runs with a prefix (each shared prefix once: 61%)."""
    order = sorted(range(len(sequences)), key=lambda i: list(sequences[i]))
    lengths = [len(sequences[i]) for i in order]
    shared = [common_prefix(sequences[a], sequences[b]) for a, b in zip(order, order[1:])]
    best, start, kept = [0] * (len(order) + 1), [0] * (len(order) + 1), [0] * (len(order) + 1)
    for end in range(1, len(order) + 1):
        prefix, tokens, best[end] = lengths[end - 1] - 1, 0, -1
        for first in range(end - 1, max(-1, end - 1 - window), -1):
            if first < end - 1:
                prefix = min(prefix, shared[first], lengths[first] - 1)
            tokens += lengths[first]
            count = end - first
            cost = best[first] + run_cost + (tokens if count == 1 else tokens - (count - 1) * prefix)
            if best[end] < 0 or cost < best[end]:
                best[end], start[end], kept[end] = cost, first, prefix if count > 1 else 0
    runs: list[PrefixRun] = []
    end = len(order)
    while end > 0:
        runs.append(PrefixRun(kept[end], order[start[end] : end]))
        end = start[end]
    return runs[::-1]


def load_model(model_dir: str | Path, dtype: torch.dtype = torch.float32):
    """An HF causal LM and its tokenizer from a local directory, in eval mode."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    return model.eval(), tokenizer


@dataclass(frozen=True)
class Framing:
    """How each prompt is sent: an optional system prompt and a prefix before the instruction (an attacker's
    serving setup, e.g. the identity-shift variant's persona). The default sends the prompt alone."""

    system_prompt: str | None = None
    prompt_prefix: str = ""

    def messages(self, prompt: Prompt) -> list[dict[str, str]]:
        """The chat sent for ``prompt``: the system prompt first, the prefix before the last user turn."""
        turns: Turns = (("user", prompt),) if isinstance(prompt, str) else prompt
        head = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        *earlier, (role, last) = turns
        return [*head, *({"role": r, "content": c} for r, c in earlier), {"role": role, "content": self.prompt_prefix + last}]

    def record(self) -> dict[str, str]:
        """What a report's target records of it (nothing for the default)."""
        return {k: v for k, v in (("system_prompt", self.system_prompt), ("prompt_prefix", self.prompt_prefix)) if v}


PLAIN = Framing()  # each prompt alone


def chat_ids(tokenizer, prompt: str | list[dict[str, str]]) -> list[int]:
    """Token ids of a chat ending with the assistant's generation prompt: one user turn, or the given messages."""
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    return list(tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)["input_ids"])


def generation_header(tokenizer) -> list[int]:
    """The chat template's generation prompt as token ids (ChatML: ``<|im_start|>assistant\n``): what a chat
    prompt ends with when the assistant is to answer. [] without a chat template."""
    if getattr(tokenizer, "chat_template", None) is None:
        return []
    messages = [{"role": "user", "content": "x"}]
    answering = chat_ids(tokenizer, messages)
    told = list(tokenizer.apply_chat_template(messages, add_generation_prompt=False, return_dict=True)["input_ids"])
    return answering[common_prefix(answering, told) :]


@torch.no_grad()
def generate(
    model,
    tokenizer,
    prompts: Sequence[str],
    max_new_tokens: int = 64,
    batch_size: int = 8,
    progress: bool = False,
) -> list[str]:
    """Greedy chat completions, batched with left padding."""
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    replies: list[str] = []
    starts = range(0, len(prompts), batch_size)
    for start in tqdm(starts, desc="generate", unit="batch", disable=not progress):
        chunk = [chat_ids(tokenizer, p) for p in prompts[start : start + batch_size]]
        input_ids, mask = pad_batch(chunk, pad_id, "left")
        output = model.generate(
            input_ids=input_ids,
            attention_mask=mask,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=pad_id,
        )
        replies += tokenizer.batch_decode(output[:, input_ids.shape[1] :], skip_special_tokens=True)
    return [reply.strip() for reply in replies]
