"""Under an attention-pooled gate a request reads the prefix cache up to its pooled read's start, in whole blocks
(``safetylock_vllm.cache``); the served behaviour is ``test_vllm_gated_pooled``'s."""

from vllm.v1.core.kv_cache_manager import KVCacheBlocks
from vllm.v1.core.kv_cache_utils import KVCacheBlock

from safetylock_vllm.cache import cut


def hit(blocks: int, groups: int = 1, block_size: int = 32) -> tuple:
    """What ``get_computed_blocks`` returns for ``blocks`` cached blocks in each of ``groups`` groups."""
    found = KVCacheBlocks(tuple([KVCacheBlock(100 * g + i) for i in range(blocks)] for g in range(groups)))
    return found, blocks * block_size, 7


def test_a_hit_past_the_limit_is_cut_to_the_whole_blocks_before_it():
    blocks, computed, boundary = cut(hit(3), 70)
    assert [b.block_id for b in blocks.blocks[0]] == [0, 1] and computed == 64 and boundary == 0


def test_a_hit_within_the_limit_is_left_as_it_is():
    found = hit(2)
    assert cut(found, 64) is found and cut(found, 90) is found


def test_a_limit_inside_the_first_block_reads_nothing():
    blocks, computed, boundary = cut(hit(3), 31)
    assert blocks.blocks == ((),) and computed == 0 and boundary == 0


def test_several_kv_cache_groups_read_nothing_past_the_limit():
    blocks, computed, _ = cut(hit(2, groups=2), 40)
    assert blocks.blocks == ((), ()) and computed == 0
