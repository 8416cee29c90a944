"""Worker side: fold the lock into the served model after loading, or install the per-token scale.

Static mode (one α for everything): ``b_l = W_o·δ_l`` becomes each locked layer's ``o_proj`` bias — no extra
kernel — in the dtype that layer's kernel takes, checked by one probe forward through that kernel at start-up.
A kernel that refuses a bias, or ignores the one it is given (some CPU kernels keep a private copy made at
load time), gets ``b_l`` added to the attention block's output instead: one element-wise add, the same place
dynamic mode adds it. Either way the start-up line says which; nothing is served without the bias.
Dynamic mode (per-request α, per-adapter α or hot swap): every attention block adds
``scale[t] · table[l]`` to its output, where ``table`` holds ``W_o·δ_l`` at α = 1 for every layer and ``scale``
holds each scheduled token's α, filled by the model runner before every forward on the forward's own stream.
Both buffers are static (CUDA-graph and torch.compile safe); a hot swap copies a new table in place.
Gated mode (semantics: ``safetylock.gate``) is dynamic mode plus the gate, decided inside the graph: the gate
layer's attention block scores its input at every token and writes the score's verdict into the slot of each
request whose *last prompt token* is in the batch (``token_write``: that request's slot, else a dummy slot);
blocks after the gate layer add ``(alpha_off + after[t]·fired[slot[t]]·(α[t] − alpha_off)) · table[l]``,
``after[t]`` marking tokens at or after their request's last prompt token; blocks up to the gate layer add the
same with ``generated[t]`` (tokens after the last prompt token, whose decision an earlier forward wrote) in its
place; a gate with ``early_heads="never"`` shifts no head up to its layer. The host only writes per-token slots
and positions (known before the step); it never reads a decision back. A request keeps its slot while
the runner holds its state (preempted requests included), so a resumed request keeps its decision.
An attention-pooled gate (``read="attention"``) keeps, per request slot, the running state of its pooled read —
the largest attention logit, the weighted sum of token scores and the softmax normaliser over the tokens read so
far (an online softmax) — updated by every prefill chunk at the gate layer, so the last prompt token's decision
pools the whole prompt after its system turn however it was chunked. The host marks each step's pooled tokens and
the slots whose first pooled chunk it is (state reset). Every forwarded token's logit and score are also kept per
KV-cache slot (``KVRows``), so a request whose prompt comes partly from vLLM's prefix cache (earlier turns of a
chat) resumes its read from the rows of the tokens it read there, restored before the forward. A prompt whose
pooled tokens were neither forwarded nor restorable (a row no earlier forward wrote: a block computed in the same
step, a KV connector's tokens, several KV-cache groups) is decided as fired: fail closed, never a decision on
half a prompt (``cache`` cuts the hits that could not be restored, so this stays the exception).
Under the ``refuse`` response (``safetylock.respond``) every token is shifted at α-off, and the sampler forces
the refusal on each request whose slot fired: the host knows each row's slot, output position and α before the
step (``Forcing``); the decision itself stays on the device.
Each decision is also counted once per request (``gatecount``): after a forward, the verdicts of the requests it
decided are copied out (non-blocking, read when that copy has landed), never waited for.
The fill runs inside the runner's ``_prepare_inputs``, i.e. inside its ``synchronize_input_prep`` block: under
async scheduling the next step waits for this step's host-to-device copies before the pinned staging buffer
is written again, exactly as for vLLM's own input buffers.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass

import numpy as np
import torch

from safetylock.alpha import REQUEST_ALPHA_KEY
from safetylock.errors import LockError
from safetylock.gate import block_input
from safetylock.lockfile import SafetyLock, from_bytes
from safetylock.provenance import Verdict
from safetylock.respond import forced_logits, forced_targets, refusal_ids
from safetylock.serve.config import PreparedLock, ServeConfig, prepare
from safetylock.serve.fold import check_provenance, checked_bias, sharded_biases, sharded_multiply, unit_bias_table
from safetylock_vllm.gatecount import GateCounts
from safetylock_vllm.state import STATE


def _log(message: str, *args: object) -> None:
    from vllm.logger import init_logger

    init_logger("vllm.safetylock").info(message, *args)


def served_o_projs(model: torch.nn.Module, num_layers: int) -> list[tuple[str, torch.nn.Module]]:
    """(name, module) of vLLM's row-parallel ``o_proj`` of every decoder layer, in layer order."""
    from safetylock.geometry import output_projection_layer

    found = {}
    for name, module in model.named_modules():
        layer = output_projection_layer(name)
        if layer is not None and hasattr(module, "quant_method"):
            found.setdefault(layer, (name, module))
    if sorted(found) != list(range(num_layers)):
        raise LockError(
            f"served model exposes o_proj for layers {sorted(found)}, expected 0..{num_layers - 1}; "
            f"this architecture ({type(model).__name__}) is not supported by the safetylock plugin"
        )
    return [found[i] for i in range(num_layers)]


def _tensor_parallel() -> tuple[int, int, object]:
    from vllm.distributed import (
        get_tensor_model_parallel_rank,
        get_tensor_model_parallel_world_size,
        tensor_model_parallel_all_reduce,
    )

    size = get_tensor_model_parallel_world_size()
    return get_tensor_model_parallel_rank(), size, (tensor_model_parallel_all_reduce if size > 1 else (lambda t: t))


def activation_dtype(vllm_config) -> torch.dtype:
    """The dtype of the served model's activations (what every linear kernel receives)."""
    return vllm_config.model_config.dtype


def _local_matmul(projections: list[torch.nn.Module], dtype: torch.dtype):
    """``W_o[:, this rank's columns] · δ_slice`` through the layer's own (possibly repacked) kernel."""

    def matmul(layer: int, delta: torch.Tensor) -> torch.Tensor:
        """``W_o δ`` for a vector δ, or ``δ W_o^T`` for rows δ (this rank's columns)."""
        proj = projections[layer]
        width = delta.shape[-1]
        if getattr(proj, "input_size_per_partition", width) != width:
            raise LockError(
                f"layer {layer} o_proj holds {proj.input_size_per_partition} inputs on this rank, the lock's slice has {width}"
            )
        device = next(proj.parameters()).device
        x = delta.to(device=device, dtype=dtype).reshape(-1, width)
        try:
            out = proj.quant_method.apply(proj, x, None)
        except Exception as exc:  # a kernel that cannot take this input: refuse, never serve unlocked
            raise LockError(f"cannot fold the lock through {_kernel(proj)} on layer {layer}: {exc}") from exc
        return out.float().reshape(*delta.shape[:-1], -1)

    return matmul


def _provenance(projections: list[torch.nn.Module], prepared: PreparedLock, dtype: torch.dtype) -> Verdict:
    """Check the served ``o_proj`` weights (through their own kernels, over every TP rank) against the lock's base."""
    tp_rank, tp_size, reduce = _tensor_parallel()
    width = prepared.lock.geometry.o_proj_in_features
    return check_provenance(prepared, sharded_multiply(width, tp_rank, tp_size, _local_matmul(projections, dtype), reduce))


def _kernel(proj: torch.nn.Module) -> str:
    """The name of the linear method (and its kernel, where it has one) that computes ``proj``."""
    method = proj.quant_method
    kernel = getattr(getattr(proj, "scheme", None) or method, "kernel", None)
    return type(method).__name__ + (f"/{type(kernel).__name__}" if kernel is not None else "")


def _kernel_adds(proj: torch.nn.Module, bias: torch.Tensor, dtype: torch.dtype) -> str | None:
    """Install ``bias`` as ``proj``'s bias if its kernel adds it; None if so, else why not (``proj`` unchanged).

    One probe forward through the layer's own kernel, with and without the bias: the difference must be the
    bias, within the activation dtype's rounding. Tried in the dtype of a bias the layer already holds (kernels
    convert theirs at load), the activation dtype, then float32 (some CPU kernels take only float32 biases).
    """
    device = next(proj.parameters()).device
    probe = torch.randn(2, proj.input_size_per_partition, generator=torch.Generator().manual_seed(0)).to(device, dtype)
    old = proj.bias
    candidates = dict.fromkeys([*([old.dtype] if old is not None else []), dtype, torch.float32])
    reasons = []
    with torch.no_grad():
        plain = proj.quant_method.apply(proj, probe, old).float()
        for candidate in candidates:
            value = bias.to(device=device, dtype=candidate) + (0 if old is None else old.to(candidate))
            proj.bias = torch.nn.Parameter(value, requires_grad=False)
            try:
                added = proj.quant_method.apply(proj, probe, proj.bias).float() - plain
            except Exception as exc:
                reasons.append(f"{candidate}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
                continue
            tolerance = 4 * torch.finfo(dtype).eps * (plain.abs() + bias.abs().to(device)) + 1e-6
            if ((added - bias.to(device)).abs() <= tolerance).all():
                return None
            reasons.append(f"{candidate}: the kernel ignores the bias it is given")
        proj.bias = old
    return "; ".join(reasons)


def _add_after_block(block: torch.nn.Module, bias: torch.Tensor) -> None:
    """Add ``bias`` to every token of the attention block's output (after ``o_proj`` and its TP reduction)."""
    block.register_buffer("safetylock_bias", bias, persistent=False)
    block.register_forward_hook(lambda module, _args, output: output + module.safetylock_bias)


def fold(model: torch.nn.Module, prepared: PreparedLock, dtype: torch.dtype) -> None:
    """Static mode: add ``b_l`` to each locked layer's ``o_proj`` bias (added once, after the TP reduction),
    or, where that layer's kernel does not add a bias, to its attention block's output."""
    started = time.perf_counter()
    named = served_o_projs(model, prepared.lock.geometry.num_layers)
    projections = [module for _, module in named]
    verdict = _provenance(projections, prepared, dtype)
    tp_rank, tp_size, reduce = _tensor_parallel()
    biases = sharded_biases(prepared.lock, prepared.alpha, tp_rank, tp_size, _local_matmul(projections, dtype), reduce)
    for layer, bias in biases.items():
        proj = projections[layer]
        checked_bias(layer, bias, proj.output_size)
        if getattr(proj, "skip_bias_add", False):
            raise LockError(f"layer {layer}: o_proj returns its bias to the caller (skip_bias_add); unsupported")
    device = next(projections[0].parameters()).device
    originals = {layer: projections[layer].bias for layer in biases}
    refused = {layer: _kernel_adds(projections[layer], bias, dtype) for layer, bias in biases.items()}
    # Every rank must take the same path (only rank 0 passes the bias to its kernel).
    in_kernel = torch.tensor([float(all(reason is None for reason in refused.values()))], device=device)
    if float(reduce(in_kernel)) != tp_size:
        modules = dict(model.named_modules())
        for layer, bias in biases.items():
            projections[layer].bias = originals[layer]
            _add_after_block(modules[named[layer][0].rpartition(".")[0]], bias.to(device=device, dtype=dtype))
        reason = next((r for r in refused.values() if r is not None), "another rank's kernel refuses it")
        path = f"bias added after each attention block ({_kernel(projections[0])} does not add a bias: {reason})"
    else:
        path = f"bias folded into o_proj ({_kernel(projections[0])}, {projections[next(iter(biases))].bias.dtype})"
    _log(
        "safetylock: locked %d heads in %d layers, alpha=%g, lock %s (%s), tp %d/%d, %s, %s, applied in %.1f ms",
        prepared.lock.num_heads_locked,
        len(biases),
        prepared.alpha,
        prepared.lock.fingerprint,
        prepared.config.lock,
        tp_rank,
        tp_size,
        path,
        verdict.describe(),
        1000 * (time.perf_counter() - started),
    )


@dataclass
class GateBuffers:
    """Gated mode's static buffers (on the model's device) and the host's slot table."""

    layer: int
    weight: torch.Tensor  # [hidden] float32: the gate's weight
    params: torch.Tensor  # [2] float32: bias, threshold
    fired: torch.Tensor  # [slots + 1] model dtype: each request slot's decision; the last slot is a dummy
    token_slot: torch.Tensor  # [capacity] int64: each scheduled token's request slot
    token_write: torch.Tensor  # [capacity] int64: the slot a last prompt token writes, else the dummy slot
    token_after: torch.Tensor  # [capacity] model dtype: 1 at or after the request's last prompt token
    token_generated: torch.Tensor  # [capacity] model dtype: 1 after the request's last prompt token
    early_heads: str  # the served gate's early_heads (fixed for the graph: hooks are installed at start-up)
    slots: dict[str, int]  # request id -> slot, while the runner holds the request
    counts: GateCounts | None = None  # where decisions are counted (TP rank 0, under an API-side process)
    deciding: list[tuple[str, int]] = dataclasses.field(default_factory=list)  # (request, slot) of this step
    copies: list[tuple[list[str], torch.Tensor, object]] = dataclasses.field(default_factory=list)  # in flight
    counted: set[str] = dataclasses.field(default_factory=set)  # requests already counted (recompute: once)
    refusal: torch.Tensor | None = None  # host int64: the refuse response's tokens (message, end-of-sequence), else None
    forcing: Forcing | None = None  # this step's rows, made by ``fill``, taken by the sampler
    pooling: PooledRead | None = None  # an attention-pooled gate's buffers and host bookkeeping

    @property
    def dummy(self) -> int:
        return self.fired.numel() - 1

    def load(self, gate) -> None:
        """Copy ``gate``'s weight, bias and threshold (and pooled read) in place (start-up and hot swap)."""
        self.weight.copy_(gate.weight.to(self.weight.device))
        self.params.copy_(torch.tensor([gate.bias, gate.threshold], dtype=torch.float32))
        if self.pooling is not None:
            self.pooling.load(gate.pooling)

    def slot(self, req_id: str, live: dict) -> int:
        """The slot of ``req_id``; slots of requests the runner no longer holds are freed first when needed."""
        if req_id not in self.slots:
            if len(self.slots) >= self.dummy:
                for gone in [r for r in self.slots if r not in live]:
                    del self.slots[gone]
                    self.counted.discard(gone)
                    if self.pooling is not None:
                        self.pooling.forget(gone)
            used = set(self.slots.values())
            self.slots[req_id] = next(i for i in range(self.dummy) if i not in used)
        return self.slots[req_id]

    def fill(self, runner, req_ids: list[str], num_scheduled_tokens: np.ndarray, alphas: list[float]) -> None:
        """Per scheduled token: its slot, the slot it writes, and whether it is at or after the last prompt token;
        under the refuse response, also this step's ``Forcing`` (requests served at ``alphas``)."""
        slots, writes, after, generated, steps = [], [], [], [], []
        computed = runner.input_batch.num_computed_tokens_cpu
        if self.pooling is not None:
            self.pooling.attach(runner)
        for index, req_id in enumerate(req_ids):
            last = runner.requests[req_id].num_prompt_tokens - 1
            positions = int(computed[index]) + np.arange(int(num_scheduled_tokens[index]))
            slot = self.slot(req_id, runner.requests)
            slots.append(np.full(len(positions), slot))
            writes.append(np.where(positions == last, slot, self.dummy))
            after.append(positions >= last)
            generated.append(positions > last)
            steps.append(int(positions[-1]) - last)  # the output position this row samples (< 0: mid-prompt)
            if self.counts is not None and last in positions:
                self.deciding.append((req_id, slot))
            if self.pooling is not None:
                request = runner.requests[req_id]
                self.pooling.plan(req_id, slot, positions, last, request.prompt_token_ids, request.block_ids)
        if self.refusal is not None:
            self.forcing = Forcing.of(self, [s[0] for s in slots], steps, alphas)
        count = int(num_scheduled_tokens.sum())
        pairs = ((self.token_slot, slots), (self.token_write, writes), (self.token_after, after))
        for buffer, values in (*pairs, (self.token_generated, generated)):
            host = torch.from_numpy(np.concatenate(values)).to(buffer.dtype)
            buffer[:count].copy_(host, non_blocking=True)
        # A CUDA graph runs the batch padded to its captured size: padding tokens must write the dummy slot, not
        # a slot left there by an earlier, larger batch.
        self.token_write[count:].fill_(self.dummy)
        if self.pooling is not None:
            self.pooling.write(count, self.dummy)

    def count(self) -> None:
        """After a forward: copy out the verdicts it wrote (non-blocking); count each copy that has landed."""
        if self.counts is None:
            return
        if self.deciding:
            index = torch.tensor([slot for _, slot in self.deciding], device=self.fired.device)
            verdicts, event = self.fired.index_select(0, index), None
            if verdicts.is_cuda:
                host = torch.empty(verdicts.shape, dtype=verdicts.dtype, pin_memory=True)
                verdicts, event = host.copy_(verdicts, non_blocking=True), torch.cuda.Event()
                event.record()
            self.copies.append(([req_id for req_id, _ in self.deciding], verdicts, event))
            self.deciding = []
        while self.copies and (self.copies[0][2] is None or self.copies[0][2].query()):
            req_ids, verdicts, _ = self.copies.pop(0)
            new = [(r, v) for r, v in zip(req_ids, verdicts.tolist()) if r not in self.counted]
            self.counted.update(r for r, _ in new)
            self.counts.add(len(new), sum(v > 0.5 for _, v in new))


POOL_FLOOR = -1e30  # the running maximum of a slot with no token read yet (finite: exp(FLOOR - FLOOR) is 1)


def merge_softmax(
    state: torch.Tensor, owner: torch.Tensor, logits: torch.Tensor, values: torch.Tensor, restart: torch.Tensor
) -> torch.Tensor:
    """Online softmax: each row's running ``[max logit, Σ weight·value, Σ weight]`` (``state``, ``[rows, 3]``; rows
    marked in ``restart`` start empty) with the tokens of ``logits`` and ``values`` added to row ``owner``. The
    served graph merges each step's pooled tokens so; a read resumed from the prefix cache, that hit's rows."""
    old_max = torch.where(restart, POOL_FLOOR, state[:, 0])
    old_sum, old_norm = torch.where(restart, 0.0, state[:, 1]), torch.where(restart, 0.0, state[:, 2])
    new_max = torch.maximum(old_max, torch.full_like(old_max, POOL_FLOOR).scatter_reduce(0, owner, logits, "amax"))
    kept, weights = torch.exp(old_max - new_max), torch.exp(logits - new_max[owner])
    total = old_sum * kept + torch.zeros_like(old_sum).index_add(0, owner, weights * values)
    norm = old_norm * kept + torch.zeros_like(old_norm).index_add(0, owner, weights)
    return torch.stack([new_max, total, norm], dim=1)


@dataclass
class PooledRead:
    """An attention-pooled gate's device buffers (see the module docstring) and the host's per-request record."""

    weight: torch.Tensor  # [hidden] float32: token scores
    query: torch.Tensor  # [hidden] float32: attention logits
    state: torch.Tensor  # [slots + 1, 3] float32: running max logit, weighted score sum, normaliser
    token_slot: torch.Tensor  # [capacity] int64: each scheduled token's slot if the gate pools it, else the dummy
    reset: torch.Tensor  # [slots + 1] float32: 1 where this step holds a slot's first pooled chunk
    broken: torch.Tensor  # [slots + 1] float32: 1 where a prompt's pooled tokens were not all forwarded
    rows: torch.Tensor  # [capacity, 2] float32: each scheduled token's attention logit and score (this step)
    system: tuple[tuple[int, ...], tuple[int, ...]]  # the ids that open and close a system turn
    resumable: bool = True  # False where pooled reads are never resumed from the prefix cache (a KV connector)
    kv: KVRows | None = None  # every KV slot's logit and score, once the KV cache exists (``attach``)
    starts: dict[str, int] = dataclasses.field(default_factory=dict)  # request -> first pooled position
    next_position: dict[str, int] = dataclasses.field(default_factory=dict)  # request -> first position not forwarded
    incomplete: set[str] = dataclasses.field(default_factory=set)  # requests decided as fired (``broken``)
    step: dict[str, list] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        self.step = self.empty_step()

    @staticmethod
    def empty_step() -> dict[str, list]:
        return {"slots": [], "reset": [], "broken": [], "kv_rows": [], "resume_rows": [], "resume_slots": []}

    def load(self, pooling) -> None:
        self.weight.copy_(pooling.weight.to(self.weight.device))
        self.query.copy_(pooling.query.to(self.query.device))

    def forget(self, req_id: str) -> None:
        self.starts.pop(req_id, None)
        self.next_position.pop(req_id, None)
        self.incomplete.discard(req_id)

    def attach(self, runner) -> None:
        """Once per engine, at its first step: the per-KV-slot rows, where one KV-cache group holds every layer and
        no KV connector serves tokens (else no read is resumed: a hit past the system turn is decided as fired)."""
        if self.kv is not None or not self.resumable:
            return
        config = getattr(runner, "kv_cache_config", None)
        groups = getattr(config, "kv_cache_groups", None) or []
        if len(groups) != 1:
            self.resumable = False
            return
        block_size = int(groups[0].kv_cache_spec.block_size)
        self.kv = KVRows(block_size, torch.zeros(config.num_blocks * block_size + 1, 2, **_like(self.rows)))

    def plan(self, req_id: str, slot: int, positions: np.ndarray, last: int, prompt_ids, block_ids) -> None:
        """One request's scheduled ``positions`` this step: which tokens are pooled, whether its state restarts or
        resumes from the rows of its prefix-cache hit."""
        from safetylock.gate import pooled_from

        if req_id not in self.starts:
            self.starts[req_id] = pooled_from(list(prompt_ids or ()), *self.system)  # embeddings alone: from 0
        start, first = self.starts[req_id], int(positions[0])
        pooled = (positions >= start) & (positions <= last)
        blocks = block_ids[0] if block_ids and len(block_ids) == 1 else None
        if self.kv is not None:
            self.step["kv_rows"].append(self.kv.rows(blocks, positions))
        if first <= start:  # the prompt is read from its first pooled token (a new or a recomputed request)
            self.step["reset"].append(slot)
            self.incomplete.discard(req_id)
        elif first <= last and self.next_position.get(req_id) != first:  # a prefix-cache hit past the pooled start
            if self.kv is not None and blocks is not None:
                self.step["resume_rows"].append(self.kv.rows(blocks, np.arange(start, first)))
                self.step["resume_slots"].append(slot)
                self.incomplete.discard(req_id)
            else:
                self.incomplete.add(req_id)  # its pooled tokens before ``first`` were never read here
        if req_id in self.incomplete:
            self.step["broken"].append(slot)
        self.step["slots"].append(np.where(pooled, slot, -1))
        self.next_position[req_id] = int(positions[-1]) + 1

    def write(self, count: int, dummy: int) -> None:
        """Copy this step's plan into the device buffers (the dummy slot restarts every step), and restore the
        state of each request resuming from its prefix-cache hit from the rows of the tokens it read."""
        step = self.step
        slots = np.concatenate(step["slots"]) if step["slots"] else np.empty(0, dtype=np.int64)
        self.token_slot[:count].copy_(torch.from_numpy(np.where(slots < 0, dummy, slots).astype(np.int64)), non_blocking=True)
        self.token_slot[count:].fill_(dummy)
        broken = list(step["broken"])
        if self.kv is not None:
            written = np.concatenate(step["kv_rows"]) if step["kv_rows"] else np.empty(0, dtype=np.int64)
            broken += self.kv.restore(self.state, written, step["resume_rows"], step["resume_slots"])
            self.kv.stage(written)
        for buffer, marked in ((self.reset, [*step["reset"], dummy]), (self.broken, broken)):
            host = torch.zeros(buffer.numel(), dtype=buffer.dtype)
            host[marked] = 1
            buffer.copy_(host, non_blocking=True)
        self.step = self.empty_step()

    def store(self) -> None:
        """After a forward: its tokens' logits and scores into their KV slots' rows."""
        if self.kv is not None:
            self.kv.store(self.rows)


def _like(tensor: torch.Tensor) -> dict[str, object]:
    return {"dtype": tensor.dtype, "device": tensor.device}


@dataclass
class KVRows:
    """An attention-pooled gate's logit and score of the token in every KV-cache slot (row ``block·size + offset``;
    the last row a dummy), written after each forward from its tokens' rows, read where a request resumes its pooled
    read from a prefix-cache hit. A block vLLM serves from its prefix cache holds the tokens it was computed for, so
    its rows are those tokens' as the gate layer saw them. The host also knows which rows some forward wrote: a
    resumed read that needs a row no earlier forward wrote (one computed in this very step, or never forwarded here)
    is decided as fired instead."""

    block_size: int
    table: torch.Tensor  # [num_blocks · block_size + 1, 2] float32
    written: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0, dtype=bool))
    pending: torch.Tensor | None = None  # this step's rows' KV slots (device), until ``store``

    def __post_init__(self) -> None:
        self.written = np.zeros(self.table.shape[0], dtype=bool)

    def rows(self, blocks: list[int] | None, positions: np.ndarray) -> np.ndarray:
        """The KV rows of ``positions`` in a request holding ``blocks`` (the dummy row where it holds none)."""
        dummy = self.table.shape[0] - 1
        if not blocks:
            return np.full(len(positions), dummy, dtype=np.int64)
        index = positions // self.block_size
        ids = np.asarray(blocks, dtype=np.int64)[np.minimum(index, len(blocks) - 1)]
        return np.where(index < len(blocks), ids * self.block_size + positions % self.block_size, dummy).astype(np.int64)

    def restore(self, state: torch.Tensor, written: np.ndarray, rows: list[np.ndarray], slots: list[int]) -> list[int]:
        """Set each resuming slot's running state from its rows (an online softmax over them); return the slots
        that cannot resume (a row not written by an earlier forward)."""
        if not rows:
            return []
        dummy = self.table.shape[0] - 1
        ok = [
            len(r) > 0 and bool(self.written[r].all()) and not np.isin(r, written).any() and bool((r != dummy).all())
            for r in rows
        ]
        broken = [s for s, fine in zip(slots, ok) if not fine]
        usable = [r for r, fine in zip(rows, ok) if fine]
        kept = [s for s, fine in zip(slots, ok) if fine]
        if not kept:
            return broken
        index = torch.from_numpy(np.concatenate(usable)).to(self.table.device, non_blocking=True)
        owner = torch.from_numpy(np.repeat(np.arange(len(kept)), [len(r) for r in usable])).to(self.table.device)
        got = self.table.index_select(0, index)
        restart = torch.ones(len(kept), dtype=torch.bool, device=got.device)
        merged = merge_softmax(torch.zeros(len(kept), 3, **_like(got)), owner, got[:, 0], got[:, 1], restart=restart)
        target = torch.tensor(kept, dtype=torch.int64).to(state.device, non_blocking=True)
        state.index_copy_(0, target, merged)
        return broken

    def stage(self, written: np.ndarray) -> None:
        """This step's tokens' KV rows, for ``store`` after the forward."""
        self.written[written] = True
        self.pending = torch.from_numpy(written).to(self.table.device, non_blocking=True)

    def store(self, rows: torch.Tensor) -> None:
        if self.pending is not None:
            self.table.index_copy_(0, self.pending, rows[: self.pending.numel()])
            self.pending = None


def _ragged(counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For items laid out ``counts[i]`` after another: each item's owner ``i`` and its index within it."""
    owner = np.repeat(np.arange(len(counts)), counts)
    return owner, np.arange(int(counts.sum())) - np.repeat(np.cumsum(counts) - counts, counts)


def _forced_logprobs(tensors, forced: torch.Tensor, targets: torch.Tensor):
    """The sampler's logprobs with each forced row's sampled-token entry set to its target at log-probability 0,
    rank 1. A processor that masks the target after the forcing (``min_tokens`` before end-of-sequence) leaves the
    sampler's own pick there, which the OpenAI completions endpoint looks the output token up by (and failed with
    500). Rows are the sampler's: where their count is not the forced rows', the tensors are left as they are."""
    if tensors is None or tensors.logprob_token_ids.shape[0] != forced.shape[0]:
        return tensors
    rows = forced.to(tensors.logprobs.device)
    ids, values = tensors.logprob_token_ids.clone(), tensors.logprobs.clone()
    ids[:, 0] = torch.where(rows, targets.to(ids.device, ids.dtype), ids[:, 0])
    values[:, 0] = torch.where(rows, 0.0, values[:, 0])
    ranks = torch.where(rows.to(tensors.selected_token_ranks.device), 1, tensors.selected_token_ranks)
    return tensors._replace(logprob_token_ids=ids, logprobs=values, selected_token_ranks=ranks)


@dataclass(frozen=True)
class Forcing:
    """One step's requests (batch order) under the refuse response: each request's slot, the output position its
    last scheduled token samples (< 0: mid-prompt), and whether it may be forced (α not 0); and, on the device, the
    rows of a step without drafts (one per request): its slot, target token and whether it may be forced."""

    slots: torch.Tensor  # [rows] int64
    targets: torch.Tensor  # [rows] int64
    forcible: torch.Tensor  # [rows] bool
    refusal: torch.Tensor  # host int64: the refusal's tokens, then end-of-sequence
    host_slots: np.ndarray  # [requests] int64
    host_steps: np.ndarray  # [requests] int64
    host_forcible: np.ndarray  # [requests] bool: α not 0

    @classmethod
    def of(cls, gate: GateBuffers, slots: list[int], steps: list[int], alphas: list[float]) -> Forcing:
        host_slots, host_steps = np.asarray(slots, dtype=np.int64), np.asarray(steps, dtype=np.int64)
        host_forcible = np.asarray(alphas, dtype=np.float64) != 0
        return cls(
            *cls._rows(gate.refusal, host_slots, host_steps, host_forcible, gate.fired.device),
            gate.refusal,
            host_slots,
            host_steps,
            host_forcible,
        )

    @staticmethod
    def _rows(refusal: torch.Tensor, slots: np.ndarray, steps: np.ndarray, forcible: np.ndarray, device):
        positions = torch.from_numpy(steps)
        return (
            torch.from_numpy(slots).to(device, non_blocking=True),
            forced_targets(refusal, positions).to(device, non_blocking=True),
            (torch.from_numpy(forcible) & (positions >= 0)).to(device, non_blocking=True),
        )

    def apply(self, fired: torch.Tensor, sample, logits: torch.Tensor):
        """Sample ``logits`` with every forcible row whose slot fired forced to its target (logits and token)."""
        if logits.shape[0] != self.slots.numel():
            raise RuntimeError(f"safetylock: {logits.shape[0]} rows to sample, {self.slots.numel()} requests prepared")
        forced = (fired[self.slots] > 0.5) & self.forcible
        output = sample(forced_logits(logits, forced, self.targets))
        tokens = output.sampled_token_ids
        output.sampled_token_ids = torch.where(forced[:, None], self.targets[:, None].to(tokens.dtype), tokens)
        output.logprobs_tensors = _forced_logprobs(output.logprobs_tensors, forced, self.targets)
        return output

    def apply_drafted(self, fired: torch.Tensor, sample, logits: torch.Tensor, drafts: torch.Tensor, counts: list[int]):
        """A speculative-decoding step: request ``r`` has ``counts[r]`` draft tokens (``drafts``, flat) and one logits
        row per draft plus one, sampling consecutive output positions up to its last scheduled token's. Every
        forcible row whose slot fired is forced to its target, and a forced request's output is what verifying its
        drafts against those targets gives: its targets up to and including the first draft that differs."""
        per = np.asarray(counts, dtype=np.int64)
        if len(per) != len(self.host_slots) or logits.shape[0] != int(per.sum()) + len(per):
            raise RuntimeError(f"safetylock: {logits.shape[0]} rows to sample, {len(self.host_slots)} requests prepared")
        owner, offset = _ragged(per + 1)  # each logits row's request and its index there
        steps = self.host_steps[owner] - per[owner] + offset
        slots, targets, forcible = self._rows(
            self.refusal, self.host_slots[owner], steps, self.host_forcible[owner], fired.device
        )
        forced = (fired[slots] > 0.5) & forcible
        output = sample(forced_logits(logits, forced, targets))
        tokens = output.sampled_token_ids  # [requests, max drafts + 1], -1 past each request's output
        device, dtype = tokens.device, tokens.dtype
        wanted = torch.full(tokens.shape, -1, dtype=dtype, device=device)
        wanted[tuple(torch.from_numpy(a).to(device) for a in (owner, offset))] = targets.to(device, dtype)
        proposed = torch.full(tokens.shape, -2, dtype=dtype, device=device)
        proposed[tuple(torch.from_numpy(a).to(device) for a in _ragged(per))] = drafts.to(device, dtype)
        accepted = torch.cumprod((proposed[:, :-1] == wanted[:, :-1]).to(torch.int64), dim=1).sum(dim=1)
        kept = torch.arange(tokens.shape[1], device=device)[None, :] <= accepted[:, None]
        first_rows = torch.from_numpy(np.cumsum(per + 1) - (per + 1)).to(forced.device)
        forced_requests = forced[first_rows].to(device)
        output.sampled_token_ids = torch.where(forced_requests[:, None], torch.where(kept, wanted, -1), tokens)
        # vLLM's logprob rows under drafts are the output grid's cells, request by request
        cells = (forced_requests[:, None] & kept).flatten()
        output.logprobs_tensors = _forced_logprobs(output.logprobs_tensors, cells, wanted.flatten())
        return output


@dataclass
class DynamicLock:
    """This worker's dynamic-mode state: the served lock, its default α and the two static buffers."""

    prepared: PreparedLock
    projections: list[torch.nn.Module]
    table: torch.Tensor  # [num_layers, hidden], W_o·δ_l at α = 1, model dtype, on the model's device
    scale: torch.Tensor  # [max tokens], each scheduled token's α
    staging: torch.Tensor  # host copy of ``scale`` (pinned on CUDA)
    gate: GateBuffers | None = None  # gated mode only

    @property
    def default_alpha(self) -> float:
        return self.prepared.alpha

    def fill(self, request_alphas: list[float], num_scheduled_tokens: np.ndarray) -> None:
        """Write each scheduled token's α (requests in batch order) into ``scale``, on the current stream."""
        count = int(num_scheduled_tokens.sum())
        if count > self.scale.numel():
            raise RuntimeError(f"safetylock: {count} scheduled tokens exceed the scale buffer ({self.scale.numel()})")
        host = self.staging[:count]
        host.copy_(torch.from_numpy(np.repeat(np.asarray(request_alphas, dtype=np.float32), num_scheduled_tokens)))
        self.scale[:count].copy_(host, non_blocking=True)

    def build_table(self, prepared: PreparedLock) -> torch.Tensor:
        """The α = 1 bias table of ``prepared`` on this rank (all ranks must call it together under TP)."""
        tp_rank, tp_size, reduce = _tensor_parallel()
        matmul = _local_matmul(self.projections, self.table.dtype)
        table = unit_bias_table(prepared.lock, tp_rank, tp_size, matmul, reduce, self.table.shape[1])
        gate = prepared.lock.gate
        if prepared.config.gated and gate.early_heads == "never":  # only heads after the gate layer are shifted
            table[: gate.layer + 1] = 0
        return table.to(device=self.table.device, dtype=self.table.dtype)

    @property
    def shift_alpha_off_only(self) -> bool:
        """Whether every token is shifted at α-off (the refuse response: fired requests are forced, not steered)."""
        return self.gate is not None and self.gate.refusal is not None

    def swap(self, config: ServeConfig, geometry, lock: SafetyLock) -> dict[str, object]:
        """Replace the lock and/or default α between engine steps: all checks first, then one in-place copy."""
        started = time.perf_counter()
        prepared = prepare(config, geometry, lock)
        if self.gate is not None and prepared.lock.gate.layer != self.gate.layer:
            raise LockError(
                f"the new lock's gate reads layer {prepared.lock.gate.layer}, the served graph layer {self.gate.layer}: "
                "restart the server to change the gate layer"
            )
        if self.gate is not None and prepared.lock.gate.read != ("last" if self.gate.pooling is None else "attention"):
            raise LockError(
                f"the new lock's gate reads {prepared.lock.gate.read!r}, the served graph another read: restart the "
                "server to change it"
            )
        if self.gate is not None and prepared.lock.gate.early_heads != self.gate.early_heads:
            raise LockError(
                f"the new lock's gate shifts early heads {prepared.lock.gate.early_heads!r}, the served graph "
                f"{self.gate.early_heads!r}: restart the server to change it"
            )
        verdict = _provenance(self.projections, prepared, self.table.dtype)
        table = self.build_table(prepared)
        self.table.copy_(table)
        if self.gate is not None:
            self.gate.load(prepared.lock.gate)
        self.prepared = prepared
        elapsed = 1000 * (time.perf_counter() - started)
        _log(
            "safetylock: swapped to lock %s (%s), alpha=%g, %s, in %.2f ms",
            prepared.lock.fingerprint,
            config.lock,
            prepared.alpha,
            verdict.describe(),
            elapsed,
        )
        return {"fingerprint": prepared.lock.fingerprint, "alpha": prepared.alpha, "apply_ms": elapsed}


def _add_locked_shift(module: torch.nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
    tokens = output.shape[0]
    return output + module.safetylock_scale[:tokens, None] * module.safetylock_table_row


def _decide_gate(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
    """Gate layer: score every token; each last prompt token writes its verdict into its request's slot."""
    hidden = block_input(args, kwargs)
    tokens = hidden.shape[0]
    params = module.safetylock_gate_params
    fired = ((hidden.float() @ module.safetylock_gate_weight + params[0]) > params[1]).to(module.safetylock_fired.dtype)
    module.safetylock_fired.index_copy_(0, module.safetylock_token_write[:tokens], fired)


def _decide_pooled_gate(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
    """Gate layer of an attention-pooled gate: fold this step's pooled tokens into each slot's running state
    (online softmax), then each last prompt token writes its verdict (last-token score plus the pooled read)."""
    hidden = block_input(args, kwargs)
    tokens = hidden.shape[0]
    h = hidden.float()
    slot = module.safetylock_pool_slot[:tokens]
    logits, values = h @ module.safetylock_pool_query, h @ module.safetylock_pool_weight
    module.safetylock_pool_rows[:tokens].copy_(torch.stack([logits, values], dim=1))  # kept per KV slot (``KVRows``)
    state = module.safetylock_pool_state
    merged = merge_softmax(state, slot, logits, values, restart=module.safetylock_pool_reset > 0)
    state.copy_(merged)
    total, norm = merged[:, 1], merged[:, 2]
    write = module.safetylock_token_write[:tokens]
    pooled = (total / norm.clamp_min(1e-30))[write]
    params = module.safetylock_gate_params
    score = h @ module.safetylock_gate_weight + params[0] + pooled
    fired = (score > params[1]) | (module.safetylock_pool_broken[write] > 0)
    module.safetylock_fired.index_copy_(0, write, fired.to(module.safetylock_fired.dtype))


def _gated_shift(alpha_off: float):
    def hook(module: torch.nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        tokens = output.shape[0]
        on = module.safetylock_fired[module.safetylock_token_slot[:tokens]] * module.safetylock_token_after[:tokens]
        scale = alpha_off + on * (module.safetylock_scale[:tokens] - alpha_off)
        return output + scale[:, None] * module.safetylock_table_row

    return hook


def install_dynamic(model: torch.nn.Module, prepared: PreparedLock, vllm_config) -> None:
    """Dynamic mode: register the buffers and the forward hook on every attention block."""
    if getattr(vllm_config, "use_v2_model_runner", False):
        raise LockError(
            "per-request alpha, adapter alpha and hot swap need vLLM's V1 model runner; "
            "start with VLLM_USE_V2_MODEL_RUNNER=0 or drop those safetylock options"
        )
    started = time.perf_counter()
    named = served_o_projs(model, prepared.lock.geometry.num_layers)
    projections = [module for _, module in named]
    width = projections[0].output_size
    device, dtype = next(projections[0].parameters()).device, activation_dtype(vllm_config)
    compilation = vllm_config.compilation_config
    capacity = max(
        vllm_config.scheduler_config.max_num_batched_tokens, getattr(compilation, "max_cudagraph_capture_size", 0) or 0
    )
    scale = torch.zeros(capacity, dtype=dtype, device=device)
    staging = torch.zeros(capacity, dtype=dtype, pin_memory=device.type == "cuda")
    verdict = _provenance(projections, prepared, dtype)
    state = DynamicLock(prepared, projections, torch.zeros(len(named), width, dtype=dtype, device=device), scale, staging)
    state.table.copy_(state.build_table(prepared))
    modules = dict(model.named_modules())
    blocks = [modules[name.rpartition(".")[0]] for name, _ in named]
    gate = prepared.lock.gate if prepared.config.gated else None
    if gate is not None:
        state.gate = _install_gate(blocks, gate, vllm_config, capacity, device, dtype)
        state.gate.counts = GateCounts.attach() if _tensor_parallel()[0] == 0 else None
        if prepared.config.response.refuses:
            state.gate.refusal = refusal_tokens(prepared.config.response.message, vllm_config)
    for layer, block in enumerate(blocks):
        if gate is not None and not gate.shifts_when_generating(layer):
            continue
        block.register_buffer("safetylock_scale", scale, persistent=False)
        block.register_buffer("safetylock_table_row", state.table[layer], persistent=False)
        if gate is None:
            block.register_forward_hook(_add_locked_shift)
        else:
            # Up to the gate layer the decision is read from generated tokens on (an earlier forward made it).
            after = state.gate.token_after if gate.shifts_on_prompt(layer) else state.gate.token_generated
            block.register_buffer("safetylock_token_after", after, persistent=False)
            for name in ("fired", "token_slot"):
                block.register_buffer(f"safetylock_{name}", getattr(state.gate, name), persistent=False)
            block.register_forward_hook(_gated_shift(prepared.config.alpha_off))
    STATE.dynamic = state
    _log(
        "safetylock: locked %d heads in %d layers, default alpha=%g, lock %s (%s), %s (policy %s), tp %d/%d, "
        "%s, applied in %.1f ms",
        prepared.lock.num_heads_locked,
        int((state.table.abs().sum(dim=1) > 0).sum()),
        prepared.alpha,
        prepared.lock.fingerprint,
        prepared.config.lock,
        _mode_text(prepared),
        prepared.config.policy.summary(),
        *_tensor_parallel()[:2],
        verdict.describe(),
        1000 * (time.perf_counter() - started),
    )


def refusal_tokens(message: str, vllm_config) -> torch.Tensor:
    """The refuse response's tokens in the served tokenizer; LockError where they cannot be forced."""
    from vllm.tokenizers.registry import cached_get_tokenizer

    model_config = vllm_config.model_config
    try:
        tokenizer = cached_get_tokenizer(
            model_config.tokenizer, revision=model_config.tokenizer_revision, trust_remote_code=model_config.trust_remote_code
        )
    except Exception as exc:
        raise LockError(f"the refuse response needs the served tokenizer ({model_config.tokenizer}): {exc}") from exc
    ids = refusal_ids(tokenizer, message)
    vocab = model_config.get_vocab_size()
    if max(ids) >= vocab:
        raise LockError(f"the refusal's token {max(ids)} is outside the served model's vocabulary ({vocab})")
    return torch.tensor(ids, dtype=torch.int64)


def _mode_text(prepared: PreparedLock) -> str:
    gate = prepared.lock.gate
    if not prepared.config.gated:
        return "dynamic"
    calibration = {k: gate.calibration[k] for k in ("auroc", "fpr", "tpr") if k in gate.calibration}
    early = "every head from the first generated token" if gate.early_heads == "generated" else "no earlier head"
    return (
        f"gated (gate at layer {gate.layer}, read {gate.read}, threshold {gate.threshold:.4g}, {calibration}, "
        f"alpha_off={prepared.config.alpha_off:g}, heads after layer {gate.layer} from the last prompt token, {early}, "
        f"response {prepared.config.response.kind}"
        + (f": {prepared.config.response.message!r}" if prepared.config.response.refuses else "")
        + ")"
    )


def _install_gate(blocks: list[torch.nn.Module], gate, vllm_config, capacity: int, device, dtype) -> GateBuffers:
    """Gated mode: the gate's buffers, and the deciding hook on the gate layer's attention block."""
    slots = vllm_config.scheduler_config.max_num_seqs
    buffers = GateBuffers(
        layer=gate.layer,
        weight=torch.zeros(gate.weight.numel(), dtype=torch.float32, device=device),
        params=torch.zeros(2, dtype=torch.float32, device=device),
        fired=torch.zeros(slots + 1, dtype=dtype, device=device),
        token_slot=torch.zeros(capacity, dtype=torch.int64, device=device),
        token_write=torch.full((capacity,), slots, dtype=torch.int64, device=device),
        token_after=torch.zeros(capacity, dtype=dtype, device=device),
        token_generated=torch.zeros(capacity, dtype=dtype, device=device),
        early_heads=gate.early_heads,
        slots={},
    )
    if gate.pooling is not None:
        pooling = gate.pooling
        floats = {"dtype": torch.float32, "device": device}
        buffers.pooling = PooledRead(
            weight=torch.zeros(pooling.weight.numel(), **floats),
            query=torch.zeros(pooling.query.numel(), **floats),
            state=torch.zeros(slots + 1, 3, **floats),
            token_slot=torch.full((capacity,), slots, dtype=torch.int64, device=device),
            reset=torch.ones(slots + 1, **floats),
            broken=torch.zeros(slots + 1, **floats),
            rows=torch.zeros(capacity, 2, **floats),
            system=(pooling.system_head, pooling.system_end),
            resumable=getattr(vllm_config, "kv_transfer_config", None) is None,
        )
    buffers.load(gate)
    block = blocks[gate.layer]
    block.register_buffer("safetylock_gate_weight", buffers.weight, persistent=False)
    block.register_buffer("safetylock_gate_params", buffers.params, persistent=False)
    block.register_buffer("safetylock_fired", buffers.fired, persistent=False)
    block.register_buffer("safetylock_token_write", buffers.token_write, persistent=False)
    if buffers.pooling is None:
        block.register_forward_pre_hook(_decide_gate, with_kwargs=True)
        return buffers
    for name in ("weight", "query", "state", "reset", "broken", "rows"):
        block.register_buffer(f"safetylock_pool_{name}", getattr(buffers.pooling, name), persistent=False)
    block.register_buffer("safetylock_pool_slot", buffers.pooling.token_slot, persistent=False)
    block.register_forward_pre_hook(_decide_pooled_gate, with_kwargs=True)
    return buffers


def fill_scale(runner, num_scheduled_tokens: np.ndarray) -> None:
    """Called by the V1 model runner before each forward: per-token α for the batch it is about to run."""
    state = STATE.dynamic
    if state is None:
        return
    req_ids = runner.input_batch.req_ids[: len(num_scheduled_tokens)]
    alphas = []
    for req_id in req_ids:
        params = getattr(runner.requests[req_id], "sampling_params", None)
        extra = (params.extra_args if params is not None else None) or {}
        alphas.append(float(extra.get(REQUEST_ALPHA_KEY, state.default_alpha)))
    shifts = [state.prepared.config.alpha_off] * len(alphas) if state.shift_alpha_off_only else alphas
    state.fill(shifts, num_scheduled_tokens)
    if state.gate is not None:
        state.gate.fill(runner, req_ids, num_scheduled_tokens, alphas)


def sample(runner, original, logits, spec_decode_metadata):
    """The V1 runner's ``_sample`` under the refuse response: rows of requests whose gate fired are forced."""
    state = STATE.dynamic
    gate = state.gate if state is not None else None
    if gate is None or gate.refusal is None or logits is None:
        return original(runner, logits, spec_decode_metadata)
    forcing, gate.forcing = gate.forcing, None
    if forcing is None:
        raise RuntimeError("safetylock: a sampling step without its prepared rows; refusing to sample unforced")
    if spec_decode_metadata is None:
        return forcing.apply(gate.fired, lambda forced: original(runner, forced, None), logits)
    return forcing.apply_drafted(
        gate.fired,
        lambda forced: original(runner, forced, spec_decode_metadata),
        logits,
        spec_decode_metadata.draft_token_ids,
        list(spec_decode_metadata.num_draft_tokens),
    )


def count_gate() -> None:
    """Called by the V1 model runner after each forward: keep its tokens' pooled-read rows (``KVRows``) and count
    the gate decisions it made."""
    state = STATE.dynamic
    if state is not None and state.gate is not None:
        if state.gate.pooling is not None:
            state.gate.pooling.store()
        state.gate.count()


def swap_rpc(
    worker, lock: str, alpha: float | None = None, data: bytes | None = None, fingerprint: str | None = None
) -> dict[str, object]:
    """The ``safetylock_swap`` worker method reached by ``collective_rpc``: the lock file's bytes as the API
    server read them (None: keep the served lock, change α only), checked against the ``fingerprint`` it
    validated, so every rank applies the very lock the API server checked."""
    from pathlib import Path

    from safetylock.geometry import head_geometry

    state = STATE.dynamic
    if state is None:
        raise LockError("this server was started without hot swap (set SAFETYLOCK_ADMIN_TOKEN before starting it)")
    new = state.prepared.lock if data is None else from_bytes(data, lock)
    if fingerprint is not None and new.fingerprint != fingerprint:
        raise LockError(f"the worker's lock {new.fingerprint} is not the one the API server checked ({fingerprint})")
    config = dataclasses.replace(state.prepared.config, lock=Path(lock), alpha=alpha, hot_swap=True)
    return state.swap(config, head_geometry(worker.vllm_config.model_config.hf_config), new)
