"""BlockManager: free-list allocation, growth, freeing, capacity checks and usage counts."""

import pytest

from loraplex.core.block_manager import BlockManager
from loraplex.core.sequence import Sequence


def _seq(seq_id=0):
    return Sequence(seq_id=seq_id, token_ids=[1], num_prompt_tokens=1)


def test_allocate_grows_the_table_block_by_block():
    bm = BlockManager(num_blocks=8, block_size=4)
    seq = _seq()
    bm.allocate(seq, 5)                       # 5 tokens -> 2 blocks
    assert len(seq.block_table) == 2 and bm.num_free_blocks == 6
    bm.allocate(seq, 8)                       # still fits in 2 blocks
    assert len(seq.block_table) == 2
    bm.allocate(seq, 9)
    assert len(seq.block_table) == 3 and bm.num_used_blocks == 3
    assert bm.usage == pytest.approx(3 / 8)


def test_blocks_are_never_shared_and_come_back_on_free():
    bm = BlockManager(num_blocks=6, block_size=2)
    a, b = _seq(0), _seq(1)
    bm.allocate(a, 5)
    bm.allocate(b, 6)
    assert not set(a.block_table) & set(b.block_table)
    assert bm.num_free_blocks == 0
    assert not bm.can_allocate(a, 7) and bm.can_allocate(a, 6)
    bm.free(a)
    assert a.block_table == [] and bm.num_free_blocks == 3
    assert bm.can_allocate(_seq(2), 6) and not bm.can_allocate(_seq(2), 7)
    bm.free(b)
    assert bm.num_free_blocks == 6 and bm.usage == 0.0
    assert sorted(bm._free) == list(range(6))


def test_allocating_past_the_pool_raises_without_taking_blocks():
    bm = BlockManager(num_blocks=2, block_size=4)
    seq = _seq()
    with pytest.raises(RuntimeError, match="out of KV-cache blocks"):
        bm.allocate(seq, 9)
    assert seq.block_table == [] and bm.num_free_blocks == 2


def test_num_blocks_for():
    bm = BlockManager(num_blocks=2, block_size=16)
    assert [bm.num_blocks_for(n) for n in (0, 1, 16, 17, 32, 33)] == [0, 1, 1, 2, 2, 3]
