"""Stage 1 — capture: per-head attention outputs (the ``o_proj`` input) at the last tokens of each example."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from tqdm import tqdm

from safetylock.contrast import ContrastExample
from safetylock.errors import ExtractError
from safetylock.geometry import HeadGeometry, head_geometry, output_projections
from safetylock.hf import autocast, pad_batch


@dataclass
class HeadActivations:
    """Captured activations ``values[example, token, layer, head, dim]`` with labels and question groups."""

    values: torch.Tensor
    labels: torch.Tensor  # 1 = safe, 0 = unsafe, per example
    groups: torch.Tensor  # question index per example
    geometry: HeadGeometry
    tokens: int


def render(tokenizer, question: str, response: str) -> tuple[list[int], int]:
    """Token ids of ``question`` + ``response`` in the model's chat template, and the response length.

    The response is appended to the generation prompt as the model would have produced it, with no
    end-of-turn token after it, so the last tokens are the response's own.
    """
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True, tokenize=False)
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    full_ids = tokenizer(prompt + response, add_special_tokens=False)["input_ids"]
    return full_ids, len(full_ids) - len(prompt_ids)


def last_token_positions(mask: torch.Tensor, count: int, skip: int = 0) -> torch.Tensor:
    """Indices ``[batch, count]`` of the ``count`` attended tokens of each row that end ``skip`` tokens before
    its last one, in order."""
    ends = mask.shape[1] - 1 - mask.flip(1).argmax(1) - skip  # index of the last recorded token
    return ends[:, None] - torch.arange(count - 1, -1, -1)[None, :]


def _backbone(model: torch.nn.Module) -> torch.nn.Module:
    """The decoder without its LM head: capture never needs logits."""
    return getattr(model, getattr(model, "base_model_prefix", ""), None) or model


@torch.no_grad()
def capture(
    model: torch.nn.Module,
    tokenizer,
    examples: Sequence[ContrastExample],
    tokens: int = 5,
    batch_size: int = 16,
    padding_side: str = "right",
    progress: bool = True,
    skip: int = 0,
    precision: str = "float32",
) -> HeadActivations:
    """Record every head's output at the last ``tokens`` tokens of each example, or at the ``tokens`` before its
    last ``skip`` (inside a full answer rather than at its end); the forward in ``precision``
    (``safetylock.hf.forward_precision``), the record float32 either way.

    Those are the response's own tokens; an example with an empty response is recorded at the end of its
    generation prompt, where the model decides how to answer.
    """
    geometry = head_geometry(model.config)
    projections = output_projections(model, geometry)
    rendered = [render(tokenizer, ex.question, ex.response) for ex in examples]
    for (_, response_len), ex in zip(rendered, examples):
        if ex.response and response_len < tokens + skip:
            raise ExtractError(
                f"response {ex.response!r} has {response_len} tokens, fewer than the {tokens + skip} read ({skip} skipped)"
            )
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device = next(model.parameters()).device
    out = torch.empty((len(examples), tokens, geometry.num_layers, geometry.num_heads, geometry.head_dim), dtype=torch.float32)
    positions: torch.Tensor | None = None
    batch_rows = torch.zeros(0, dtype=torch.long)

    def recorder(layer: int):
        def hook(_module, args):
            hidden = args[0]  # [batch, seq, heads * head_dim]
            picked = hidden.gather(1, positions[:, :, None].expand(-1, -1, hidden.shape[-1]).to(hidden.device))
            out[batch_rows, :, layer] = picked.float().cpu().view(-1, tokens, geometry.num_heads, geometry.head_dim)

        return hook

    handles = [proj.register_forward_pre_hook(recorder(i)) for i, proj in enumerate(projections)]
    backbone = _backbone(model)
    try:
        with autocast(model, precision):
            order = sorted(range(len(examples)), key=lambda i: len(rendered[i][0]))  # batches of like length: less padding
            starts = range(0, len(examples), batch_size)
            for start in tqdm(starts, desc="capture", unit="batch", disable=not progress):
                batch_rows = torch.tensor(order[start : start + batch_size])
                chunk = [rendered[i][0] for i in batch_rows.tolist()]
                input_ids, mask = pad_batch(chunk, pad_id, padding_side)
                positions = last_token_positions(mask, tokens, skip)
                position_ids = (mask.cumsum(1) - 1).clamp(min=0)
                backbone(
                    input_ids=input_ids.to(device),
                    attention_mask=mask.to(device),
                    position_ids=position_ids.to(device),
                    use_cache=False,
                )
    finally:
        for handle in handles:
            handle.remove()
    labels = torch.tensor([ex.safe for ex in examples], dtype=torch.long)
    groups = torch.tensor([ex.group for ex in examples], dtype=torch.long)
    return HeadActivations(out, labels, groups, geometry, tokens)
