"""Stage 4 — apply: fold α·σ·direction into one ``o_proj`` bias per layer, ``b_l = W_o · δ_l``."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from safetylock.errors import LockError
from safetylock.gate import Gate
from safetylock.geometry import HeadGeometry, head_geometry, output_projections
from safetylock.lockfile import SafetyLock, check_alpha
from safetylock.provenance import Verdict, check, hf_multiply
from safetylock.respond import forced_logits, forced_targets


def layer_shifts(lock: SafetyLock, alpha: float) -> dict[int, torch.Tensor]:
    """δ_l for each locked layer: the ``o_proj`` input shift, α·σ·direction placed in each head's slice."""
    geo = lock.geometry
    shifts: dict[int, torch.Tensor] = {}
    for layer, head, direction, sigma in zip(lock.layers.tolist(), lock.heads.tolist(), lock.directions, lock.sigmas):
        delta = shifts.setdefault(layer, torch.zeros(geo.o_proj_in_features, dtype=torch.float32))
        delta[head * geo.head_dim : (head + 1) * geo.head_dim] += alpha * float(sigma) * direction
    return shifts


def fold_bias(weight: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """``W_o · δ`` in fp32: the constant that ``o_proj`` adds to its output when its input moves by δ."""
    return weight.detach().to(torch.float32) @ delta.to(weight.device, torch.float32)


@dataclass
class LockHandle:
    """Undo record of an applied lock: ``remove()`` (or leaving the ``with`` block) restores the model."""

    lock: SafetyLock
    alpha: float
    projections: dict[int, torch.nn.Linear]
    original_bias: dict[int, torch.Tensor | None] = field(default_factory=dict)
    provenance: Verdict | None = None
    active: bool = True

    def remove(self) -> None:
        if not self.active:
            return
        for layer, proj in self.projections.items():
            original = self.original_bias[layer]
            if original is None:
                proj.bias = None
            else:
                with torch.no_grad():
                    proj.bias.copy_(original)
        self.active = False

    def __enter__(self) -> LockHandle:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.remove()


def check_model(lock: SafetyLock, model: torch.nn.Module) -> HeadGeometry:
    """The model's head geometry, after checking that the lock fits it."""
    geometry = head_geometry(model.config)
    lock.check_geometry(geometry)
    return geometry


def apply(model: torch.nn.Module, lock: SafetyLock, alpha: float | None = None, allow_foreign_base: bool = False) -> LockHandle:
    """Lock an HF transformers model in place; use as ``with apply(model, lock, 6): ...``.

    The bias is computed from *this* model's ``o_proj`` weights, so one Meta-SafetyLock serves every
    fine-tuned variant of its base; a model that does not descend from that base (by the lock's weight
    sketch, see ``safetylock.provenance``) raises LockError unless ``allow_foreign_base``.
    """
    alpha = check_alpha(lock.default_alpha if alpha is None else alpha)
    geometry = check_model(lock, model)
    projections = output_projections(model, geometry)
    verdict = check(lock, hf_multiply(projections), allow_foreign_base)
    handle = LockHandle(lock, alpha, {}, provenance=verdict)
    with torch.no_grad():
        for layer, delta in layer_shifts(lock, alpha).items():
            proj = projections[layer]
            bias = fold_bias(proj.weight, delta).to(proj.weight.dtype)
            handle.projections[layer] = proj
            if proj.bias is None:
                handle.original_bias[layer] = None
                proj.bias = torch.nn.Parameter(bias, requires_grad=False)
            else:
                handle.original_bias[layer] = proj.bias.detach().clone()
                proj.bias.add_(bias)
    return handle


@dataclass
class GatedHandle:
    """Undo record of a gated lock on an HF model: ``remove()`` (or leaving the ``with`` block) unhooks it.
    ``fired`` holds the last prompt batch's gate decisions (one per row); ``refusal`` the forced answer's tokens
    under the ``refuse`` response (``safetylock.respond``), else None."""

    gate: Gate
    alpha_on: float
    alpha_off: float
    hooks: list = field(default_factory=list)
    fired: torch.Tensor | None = None
    provenance: Verdict | None = None
    refusal: torch.Tensor | None = None

    def force(self, logits: torch.Tensor, step: int) -> torch.Tensor:
        """Next-token ``logits`` [rows, vocab] of output position ``step`` under the response policy: rows whose
        gate fired become the refusal's token there (``refuse``, α-on not 0); unchanged otherwise."""
        if self.refusal is None or self.alpha_on == 0 or self.fired is None:
            return logits
        steps = torch.full((logits.shape[0],), step, dtype=torch.int64)
        return forced_logits(logits, self.fired, forced_targets(self.refusal, steps))

    def logits_processor(self, prompt_width: int):
        """``force`` as a transformers logits processor for ``model.generate`` on prompts ``prompt_width`` wide."""
        return lambda input_ids, scores: self.force(scores, input_ids.shape[1] - prompt_width)

    def remove(self) -> None:
        for hook in self.hooks:
            hook.remove()
        self.hooks.clear()

    def __enter__(self) -> GatedHandle:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.remove()


def apply_gated(
    model: torch.nn.Module,
    lock: SafetyLock,
    alpha_on: float | None = None,
    alpha_off: float = 0.0,
    allow_foreign_base: bool = False,
    refusal: Sequence[int] | None = None,
) -> GatedHandle:
    """The gated lock on an HF model (semantics: ``safetylock.gate``): ``with apply_gated(model, lock, 4): ...``.

    ``refusal``: None serves requests whose gate fires at α-on (``steer``); token ids (``respond.refusal_ids``)
    answer them with those tokens instead (``refuse``: heads at α-off for every request; pass
    ``handle.logits_processor(...)`` to ``generate`` or ``handle.force`` the logits of each step).
    Made for ``model.generate`` on left-padded batches: a forward of more than one token is a new batch of
    prompts, whose last position is every row's last prompt token; a one-token forward is a decode step. An
    attention-pooled gate reads the prompt's ids and attention mask from the model's call.
    """
    from safetylock.gate import attention_blocks, block_input

    if lock.gate is None:
        raise LockError("this lock has no gate: extract it with `safetylock extract` (without --no-gate)")
    gate = lock.gate
    alpha_on = check_alpha(lock.default_alpha if alpha_on is None else alpha_on)
    alpha_off = check_alpha(alpha_off, "alpha_off")
    geometry = check_model(lock, model)
    projections = output_projections(model, geometry)
    verdict = check(lock, hf_multiply(projections), allow_foreign_base)
    blocks = attention_blocks(model, geometry.num_layers)
    forced = None if refusal is None else torch.tensor(list(refusal), dtype=torch.int64)
    if forced is not None and forced.numel() == 0:
        raise LockError("the refuse response needs at least one refusal token")
    handle = GatedHandle(gate, alpha_on, alpha_off, provenance=verdict, refusal=forced)
    shift_on = alpha_off if forced is not None else alpha_on  # refuse: a fired request's answer is forced, not steered

    prompt: dict[str, torch.Tensor | None] = {"start": None}  # the prompt batch's first pooled positions

    def read_ids(_module, args, kwargs):
        """An attention-pooled gate: where each row's pooled read starts (left padding counted)."""
        ids, mask = kwargs.get("input_ids", args[0] if args else None), kwargs.get("attention_mask")
        if ids is None:
            raise LockError("an attention-pooled gate reads the prompt's token ids: call the model with input_ids")
        if ids.shape[1] > 1:
            mask = torch.ones_like(ids) if mask is None else mask[:, -ids.shape[1] :]
            pads = (mask == 0).sum(1).tolist()
            rows = [row[pad:].tolist() for row, pad in zip(ids, pads)]
            prompt["start"] = torch.tensor([pad + gate.pooling.start(row) for row, pad in zip(rows, pads)])

    def decide(_module, args, kwargs):
        hidden = block_input(args, kwargs)
        if hidden.shape[1] > 1 or handle.fired is None:
            start = prompt["start"] if hidden.shape[1] > 1 else torch.zeros(len(hidden), dtype=torch.long)
            handle.fired = gate.fires(hidden, start)

    def shifter(bias: torch.Tensor, on_prompt: bool):
        def hook(_module, _args, output):
            hidden = output[0]
            if hidden.shape[1] > 1:  # a prompt forward (before the gate layer, this batch is not decided yet)
                scale = torch.full(hidden.shape[:2], alpha_off, dtype=hidden.dtype, device=hidden.device)
                if on_prompt:  # after the gate layer: the last prompt token is served at its decision
                    scale[:, -1] = torch.where(handle.fired, shift_on, alpha_off).to(hidden.dtype)
            else:  # a generated token: every shifted head at the request's decision
                scale = torch.where(handle.fired, shift_on, alpha_off).to(hidden.dtype)[:, None]
            return (hidden + scale[:, :, None] * bias.to(hidden.dtype), *output[1:])

        return hook

    if gate.pooling is not None:
        handle.hooks.append(model.register_forward_pre_hook(read_ids, with_kwargs=True))
    handle.hooks.append(blocks[gate.layer].register_forward_pre_hook(decide, with_kwargs=True))
    for layer, delta in layer_shifts(lock, 1.0).items():
        if gate.shifts_when_generating(layer):
            bias = fold_bias(projections[layer].weight, delta)
            handle.hooks.append(blocks[layer].register_forward_hook(shifter(bias, gate.shifts_on_prompt(layer))))
    return handle
