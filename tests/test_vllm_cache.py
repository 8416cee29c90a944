"""Which prefix-cache hits a request under an attention-pooled gate reads (``safetylock_vllm.cache``), and how the
engine restores a pooled read from the rows of the tokens it read there (``safetylock_vllm.engine.KVRows``); the
served behaviour is ``test_vllm_gated_pooled``'s."""

import numpy as np
import torch
from vllm.v1.core.kv_cache_manager import KVCacheBlocks
from vllm.v1.core.kv_cache_utils import KVCacheBlock

from safetylock_vllm.cache import Passes, cut
from safetylock_vllm.engine import POOL_FLOOR, KVRows


def hit(blocks: int, groups: int = 1, block_size: int = 32) -> tuple:
    """What ``get_computed_blocks`` returns for ``blocks`` cached blocks in each of ``groups`` groups."""
    found = KVCacheBlocks(tuple([KVCacheBlock(100 * g + i) for i in range(blocks)] for g in range(groups)))
    return found, blocks * block_size, 7


def test_without_resuming_a_hit_past_the_limit_is_cut_to_the_whole_blocks_before_it():
    blocks, computed, boundary = cut(hit(3), 70)
    assert [b.block_id for b in blocks.blocks[0]] == [0, 1] and computed == 64 and boundary == 0


def test_a_hit_within_the_limit_is_left_as_it_is():
    found = hit(2)
    assert cut(found, 64) is found and cut(found, 90) is found and cut(found, 64, set()) is found


def test_without_resuming_a_limit_inside_the_first_block_reads_nothing():
    blocks, computed, boundary = cut(hit(3), 31)
    assert blocks.blocks == ((),) and computed == 0 and boundary == 0


def test_several_kv_cache_groups_read_nothing_past_the_limit():
    blocks, computed, _ = cut(hit(2, groups=2), 40)
    assert blocks.blocks == ((), ()) and computed == 0
    blocks, computed, _ = cut(hit(2, groups=2), 40, set())
    assert blocks.blocks == ((), ()) and computed == 0


def test_resuming_reads_the_whole_hit_unless_a_block_past_the_limit_was_cached_in_this_pass():
    found = hit(4)
    assert cut(found, 40, set()) is found
    assert cut(found, 40, {0}) is found  # the system turn's block: not pooled, its rows are not needed
    blocks, computed, boundary = cut(found, 40, {2, 3})
    assert [b.block_id for b in blocks.blocks[0]] == [0, 1] and computed == 64 and boundary == 0
    blocks, computed, _ = cut(found, 40, {1})  # the block holding the pooled start
    assert [b.block_id for b in blocks.blocks[0]] == [0] and computed == 32


def test_under_steer_a_hit_stops_before_a_block_holding_a_last_prompt_token_or_an_answer():
    class Request:
        num_prompt_tokens = 70  # its last prompt token at position 69, in block 2

    passes = Passes()
    found = hit(4)
    passes.cached(Request(), found[0].blocks[0], 0, 4, 32)
    assert passes.fresh == {0, 1, 2, 3} and passes.steered == {2, 3}
    blocks, computed, boundary = passes.unsteered(found)
    assert [b.block_id for b in blocks.blocks[0]] == [0, 1] and computed == 64 and boundary == 0
    Request.num_prompt_tokens = 200  # blocks 2 and 3 cached again as another request's prompt
    passes.cached(Request(), found[0].blocks[0], 2, 4, 32)
    assert passes.steered == set() and passes.unsteered(found) is found
    passes.steered.add(101)
    blocks, computed, _ = passes.unsteered(hit(2, groups=2))
    assert blocks.blocks == ((), ()) and computed == 0


def test_restored_state_pools_the_rows_of_the_tokens_read_from_the_cache():
    draw = torch.Generator().manual_seed(3)
    kv = KVRows(4, torch.randn(4 * 6 + 1, 2, generator=draw) * 3)
    kv.written[:-1] = True
    state = torch.full((3, 3), 123.0)
    blocks = [5, 2, 0]  # a request's blocks: positions 0-3 in block 5, 4-7 in block 2, 8-11 in block 0
    first = kv.rows(blocks, np.arange(2, 9))
    second = kv.rows([1], np.arange(0, 3))
    assert first.tolist() == [22, 23, 8, 9, 10, 11, 0]
    broken = kv.restore(state, np.array([16, 17]), [first, second], [0, 1])
    assert broken == []
    for slot, rows in ((0, first), (1, second)):
        got = kv.table[torch.from_numpy(rows)]
        top, total, norm = state[slot].tolist()
        assert abs(top - float(got[:, 0].max())) < 1e-6
        want = float((torch.softmax(got[:, 0], 0) * got[:, 1]).sum())
        assert abs(total / norm - want) < 1e-5
    assert state[2].tolist() == [123.0] * 3  # slots that do not resume are left alone


def test_a_read_needing_a_row_no_earlier_forward_wrote_is_not_restored():
    kv = KVRows(4, torch.zeros(4 * 6 + 1, 2))
    kv.written[:8] = True
    state = torch.zeros(4, 3)
    computed_now = kv.rows([0, 1], np.arange(0, 8))
    never = kv.rows([3], np.arange(0, 2))  # block 3: no forward wrote it
    no_block = kv.rows([0], np.arange(0, 6))  # past the blocks the request holds: the dummy row
    broken = kv.restore(state, np.array([6, 7]), [computed_now, never, no_block, kv.rows([0], np.arange(0, 4))], [0, 1, 2, 3])
    assert broken == [0, 1, 2] and state[3, 2] > 0 and state[3, 0] > POOL_FLOOR
