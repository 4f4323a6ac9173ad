"""BlockManager: hands out fixed-size KV-cache blocks to sequences.

The KV cache is num_blocks blocks of block_size token slots. A sequence's
block_table lists its blocks in order: token i lives in block
block_table[i // block_size] at offset i % block_size. Blocks are never shared
between sequences (no prefix caching), so freeing is just returning them.
"""

from __future__ import annotations

from collections import deque

from loraplex.core.sequence import Sequence


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"need num_blocks >= 1 and block_size >= 1, got {num_blocks}, {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        # FIFO reuse spreads writes over the cache; any order would be correct.
        self._free: deque[int] = deque(range(num_blocks))

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self._free)

    @property
    def usage(self) -> float:
        """Fraction of the KV cache in use, in [0, 1] (the KV-cache usage metric)."""
        return self.num_used_blocks / self.num_blocks

    def num_blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def num_missing_blocks(self, seq: Sequence, num_tokens: int) -> int:
        """Blocks `seq` still needs so that its first num_tokens tokens have slots."""
        return max(0, self.num_blocks_for(num_tokens) - len(seq.block_table))

    def can_allocate(self, seq: Sequence, num_tokens: int) -> bool:
        return self.num_missing_blocks(seq, num_tokens) <= len(self._free)

    def allocate(self, seq: Sequence, num_tokens: int) -> None:
        """Grow seq.block_table to cover num_tokens tokens (a new prompt or appended tokens)."""
        missing = self.num_missing_blocks(seq, num_tokens)
        if missing > len(self._free):
            raise RuntimeError(
                f"out of KV-cache blocks: sequence {seq.seq_id} needs {missing}, "
                f"{len(self._free)} free (call can_allocate first)")
        for _ in range(missing):
            seq.block_table.append(self._free.popleft())

    def free(self, seq: Sequence) -> None:
        """Return all of seq's blocks to the pool."""
        self._free.extend(seq.block_table)
        seq.block_table = []
