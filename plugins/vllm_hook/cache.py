"""Scheduler side: which prefix-cache hits a request under an attention-pooled gate may read.

An attention-pooled gate reads every prompt token after the system turn. The engine keeps, for every KV-cache slot,
the gate layer's attention logit and score of the token computed there (``engine.KVRows``), so a request that
reads blocks from the prefix cache resumes its pooled read from those rows instead of forwarding them again. Two
hits cannot be resumed so and are cut here (vLLM's ``get_computed_blocks`` wrapped; the frontend writes each
request's first pooled position into it, ``CACHE_READS_KEY``):

* blocks cached in the scheduling pass under way: their tokens are computed by the forward this pass schedules, so
  their rows are not written yet when the resuming request's read is restored. The hit stops before the first such
  block past the pooled start (``Passes`` tracks them: ``Scheduler.schedule`` opens a pass,
  ``BlockPool.cache_full_blocks`` records the blocks it caches);
* a model with several KV-cache groups (sliding-window or state layers), and a server whose KV connector serves
  tokens too: the engine does not resume there, so the hit stops at the whole blocks before the pooled start (the
  system turn) or, where that cut cannot be made, reads nothing.

On a gated server under the ``steer`` response, a request's tokens from its last prompt token on are computed with
the shift its own decision chose, so a block holding such a token (the end of an earlier request's prompt, or its
answer) holds keys, values and rows that another request reading it as prompt would not have computed. Every
request there (whatever the gate's read) stops before the first such block (``Passes.steered``). Under ``refuse``
every token is shifted alike (α-off), and such blocks are read like any other.

Should a hit ever reach past what the engine can resume, the gate decides the request as fired (``engine``'s
fail-closed rule): a wrong cut over-refuses and never serves unread tokens unlocked.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

from safetylock.serve.config import serve_config

CACHE_READS_KEY = "safetylock_cache_reads"  # in sampling_params.extra_args: the first position the gate pools


@dataclass
class Passes:
    """The scheduler's current pass: the blocks it has cached so far, whether a KV connector serves tokens, and
    (under a gated lock's ``steer`` response) which cached blocks hold a token at or after a last prompt token."""

    fresh: set[int] = field(default_factory=set)  # block ids cached in the pass under way
    external_kv: bool = False
    steer: bool = False  # a gated server under the steer response
    steered: set[int] = field(default_factory=set)  # cached block ids holding a token its decision shifted
    config: object = None  # the vLLM config ``steer`` was read from (read once per scheduler)

    def open(self, scheduler) -> None:
        self.fresh.clear()
        self.external_kv = getattr(scheduler, "connector", None) is not None
        config = getattr(scheduler, "vllm_config", None)
        if config is not self.config:
            served = serve_config(getattr(config, "additional_config", None))
            self.config, self.steer = config, served is not None and served.gated and not served.response.refuses

    def cached(self, request, blocks: list, first: int, end: int, block_size: int) -> None:
        """``blocks[first:end]`` of ``request`` were just cached: fresh this pass; steered where one holds its last
        prompt token or a token after it."""
        last = request.num_prompt_tokens - 1
        for index in range(first, end):
            block_id = blocks[index].block_id
            self.fresh.add(block_id)
            if (index + 1) * block_size > last:
                self.steered.add(block_id)
            else:
                self.steered.discard(block_id)

    def unsteered(self, hit: tuple) -> tuple:
        """``hit`` less its blocks from the first steered one (the whole hit, in every group, where several)."""
        groups = hit[0].blocks
        if len(groups) != 1:
            return _empty(hit) if any(b.block_id in self.steered for group in groups for b in group) else hit
        first = next((i for i, b in enumerate(groups[0]) if b.block_id in self.steered), None)
        if first is None:
            return hit
        return _kept(hit, groups[0][:first], hit[1] // len(groups[0]))


PASSES = Passes()


def readable(request) -> int | None:
    """The first pooled position of ``request`` (vLLM's engine-side request) as the frontend wrote it; None where the
    plugin sets no limit (no attention-pooled gate)."""
    params = getattr(request, "sampling_params", None)
    value = ((params.extra_args if params is not None else None) or {}).get(CACHE_READS_KEY)
    return None if value is None else int(value)


def _empty(hit: tuple) -> tuple:
    """``hit`` with no block read, in every group."""
    return (type(hit[0])(tuple(() for _ in hit[0].blocks)), 0, *(0 for _ in hit[2:]))


def _kept(hit: tuple, blocks: list, block_size: int) -> tuple:
    found, rest = hit[0], hit[2:]
    if len(blocks) == len(found.blocks[0]):
        return hit
    kept = (list(blocks),) if blocks else ((),)
    return (type(found)(kept), len(blocks) * block_size, *(0 for _ in rest))


def cut(hit: tuple, limit: int, fresh: set[int] | None = None) -> tuple:
    """``get_computed_blocks``'s ``hit`` (blocks, computed tokens, then whatever the release adds, zeroed when
    cut) for a request whose pooled read starts at ``limit``. With ``fresh`` (the engine resumes pooled reads): one
    group's hit less its blocks from the first one in ``fresh`` that ends past ``limit``. Without: cut to the whole
    blocks within ``limit`` tokens. Several groups: no hit past ``limit``."""
    blocks, computed = hit[0], hit[1]
    if computed <= limit:
        return hit
    groups = blocks.blocks
    if not (len(groups) == 1 and len(groups[0]) > 0 and computed % len(groups[0]) == 0):
        return _empty(hit)
    block_size = computed // len(groups[0])
    if fresh is None:
        return _kept(hit, groups[0][: limit // block_size], block_size)
    first = next((i for i, b in enumerate(groups[0]) if (i + 1) * block_size > limit and b.block_id in fresh), None)
    return hit if first is None else _kept(hit, groups[0][:first], block_size)


def install() -> None:
    """Wrap ``KVCacheManager.get_computed_blocks``, ``Scheduler.schedule`` and ``BlockPool.cache_full_blocks``
    (once per process)."""
    from vllm.v1.core.block_pool import BlockPool
    from vllm.v1.core.kv_cache_manager import KVCacheManager
    from vllm.v1.core.sched.scheduler import Scheduler

    original = KVCacheManager.get_computed_blocks
    if getattr(original, "_safetylock_wrapped", False):
        return

    @functools.wraps(original)
    def get_computed_blocks(self, request, *args, **kwargs):
        hit = tuple(original(self, request, *args, **kwargs))
        if PASSES.steer and hit[1]:
            hit = PASSES.unsteered(hit)
        limit = readable(request)
        return hit if limit is None else cut(hit, limit, None if PASSES.external_kv else PASSES.fresh)

    original_schedule = Scheduler.schedule

    @functools.wraps(original_schedule)
    def schedule(self, *args, **kwargs):
        PASSES.open(self)
        return original_schedule(self, *args, **kwargs)

    original_cache = BlockPool.cache_full_blocks

    @functools.wraps(original_cache)
    def cache_full_blocks(self, request, blocks, num_cached_blocks, num_full_blocks, block_size, *args, **kwargs):
        PASSES.cached(request, blocks, num_cached_blocks, num_full_blocks, block_size)
        return original_cache(self, request, blocks, num_cached_blocks, num_full_blocks, block_size, *args, **kwargs)

    get_computed_blocks._safetylock_wrapped = True
    KVCacheManager.get_computed_blocks = get_computed_blocks
    Scheduler.schedule = schedule
    BlockPool.cache_full_blocks = cache_full_blocks
