"""Scheduler side: a request's prefix-cache reads stop where its gate's pooled read begins.

An attention-pooled gate reads every prompt token after the system turn, so those tokens must be forwarded; the
system turn before them is not read and may come from vLLM's prefix cache like any other server's. The frontend
writes the first pooled position into the request (``CACHE_READS_KEY``); here vLLM's ``get_computed_blocks`` is
wrapped so that a hit longer than that is cut to the whole blocks before it. Where the cut cannot be made safely (a
model with several KV-cache groups: sliding-window or state layers) the request reads nothing from the cache, as
if it had skipped reading it. Should a hit ever reach past the pooled start, the gate decides the request as fired
(``engine``'s fail-closed rule), so a wrong cut over-refuses and never serves unread tokens unlocked.
"""

from __future__ import annotations

import functools

CACHE_READS_KEY = "safetylock_cache_reads"  # in sampling_params.extra_args: prompt tokens the prefix cache may serve


def readable(request) -> int | None:
    """How many leading prompt tokens of ``request`` (vLLM's engine-side request) may come from the prefix cache;
    None where the plugin sets no limit."""
    params = getattr(request, "sampling_params", None)
    value = ((params.extra_args if params is not None else None) or {}).get(CACHE_READS_KEY)
    return None if value is None else int(value)


def cut(hit: tuple, limit: int) -> tuple:
    """``get_computed_blocks``'s ``hit`` (blocks, computed tokens, then whatever the release adds, zeroed when
    cut) cut to the whole blocks within ``limit`` tokens; no hit where none remain or the blocks are not one group."""
    blocks, computed, rest = hit[0], hit[1], hit[2:]
    if computed <= limit:
        return hit
    groups = blocks.blocks
    one_group = len(groups) == 1 and len(groups[0]) > 0 and computed % len(groups[0]) == 0
    block_size = computed // len(groups[0]) if one_group else 0
    keep = limit // block_size if one_group else 0
    kept = (list(groups[0][:keep]),) if keep else tuple(() for _ in groups)
    return (type(blocks)(kept), keep * block_size, *(0 for _ in rest))


def install() -> None:
    """Wrap ``KVCacheManager.get_computed_blocks`` (once per process; a request without a limit goes straight
    through)."""
    from vllm.v1.core.kv_cache_manager import KVCacheManager

    original = KVCacheManager.get_computed_blocks
    if getattr(original, "_safetylock_wrapped", False):
        return

    @functools.wraps(original)
    def get_computed_blocks(self, request, *args, **kwargs):
        hit = original(self, request, *args, **kwargs)
        limit = readable(request)
        return hit if limit is None else cut(tuple(hit), limit)

    get_computed_blocks._safetylock_wrapped = True
    KVCacheManager.get_computed_blocks = get_computed_blocks
