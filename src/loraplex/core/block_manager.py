"""BlockManager: hands out fixed-size KV-cache blocks to sequences, and (opt-in) shares prompt prefixes.

The KV cache is num_blocks blocks of block_size token slots. A sequence's
block_table lists its blocks in order: token i lives in block
block_table[i // block_size] at offset i % block_size.

Prefix caching (enable_prefix_caching): a full block of tokens (prompt or generated), once
computed and known, is registered under a hash of everything that decides its keys and
values: the sequence's tokens up to and including it (a chain: each block's hash covers
its parent's) and its cache_salt (the adapter and the version of its weights, and a
multimodal prompt's media, which its placeholder tokens do not identify; None: the
sequence neither reuses nor registers blocks). A sequence starting (or restarting after
preemption) takes the longest run of registered blocks matching its tokens, shared
(reference counted) with whoever else holds them, and computes only the rest: a
conversation's next turn finds the blocks of the previous turn's prompt and answer. At
least its last token is always computed (its logits are needed), so a block a sequence
writes is never shared. A registered block nobody holds stays cached, and is reused or,
when a free block is needed and none is left, evicted least recently freed first (a
prefix's later blocks before its earlier ones).
Without prefix caching blocks are never shared, and freeing is just returning them.

Hashes are BLAKE2b digests, not Python's hash(): a prompt crafted to collide with another
tenant's would otherwise read that tenant's cached keys and values.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict, deque

from loraplex.core.sequence import Sequence


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, *, enable_prefix_caching: bool = False) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"need num_blocks >= 1 and block_size >= 1, got {num_blocks}, {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        # FIFO reuse spreads writes over the cache; any order would be correct.
        self._free: deque[int] = deque(range(num_blocks))
        self._refs = [0] * num_blocks
        self._block_of: dict[bytes, int] = {}          # prefix hash -> its registered block
        self._hash_of: dict[int, bytes] = {}           # registered block -> its hash
        self._evictable: OrderedDict[int, None] = OrderedDict()   # registered, held by nobody; LRU first
        # Prompt tokens looked up and found in the cache (since start-up), for the hit rate.
        self.num_prefix_queries = self.num_prefix_hits = 0

    @property
    def num_free_blocks(self) -> int:
        return len(self._free) + len(self._evictable)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - self.num_free_blocks

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
        return self.num_missing_blocks(seq, num_tokens) <= self.num_free_blocks

    def allocate(self, seq: Sequence, num_tokens: int) -> None:
        """Grow seq.block_table to cover num_tokens tokens (a new prompt or appended tokens)."""
        missing = self.num_missing_blocks(seq, num_tokens)
        if missing > self.num_free_blocks:
            raise RuntimeError(
                f"out of KV-cache blocks: sequence {seq.seq_id} needs {missing}, "
                f"{self.num_free_blocks} free (call can_allocate first)")
        for _ in range(missing):
            block = self._free.popleft() if self._free else self._evict()
            self._refs[block] = 1
            seq.block_table.append(block)

    def free(self, seq: Sequence) -> None:
        """Give back seq's blocks: unshared unregistered ones to the pool, registered ones to the
        cache (last block first, so a prefix's tail is evicted before its head)."""
        for block in reversed(seq.block_table):
            self._refs[block] -= 1
            if self._refs[block] == 0:
                if block in self._hash_of:
                    self._evictable[block] = None
                else:
                    self._free.append(block)
        seq.block_table = []
        seq.num_registered_blocks = 0

    # ---- prefix caching ---------------------------------------------------------------------

    def reuse_prefix(self, seq: Sequence) -> int:
        """Start a sequence that holds no blocks with the cached blocks of the longest cached prefix
        of its tokens; returns the tokens it need not compute (num_computed_tokens is set)."""
        if not self.enable_prefix_caching or seq.cache_salt is None or seq.block_table:
            return 0
        # The last known token is always computed: its logits sample the next token.
        hashes = self._block_hashes(seq, (len(seq.token_ids) - 1) // self.block_size)
        for h in hashes:
            block = self._block_of.get(h)
            if block is None:
                break
            if self._refs[block] == 0:
                del self._evictable[block]
            self._refs[block] += 1
            seq.block_table.append(block)
        seq.num_registered_blocks = len(seq.block_table)
        seq.num_computed_tokens = len(seq.block_table) * self.block_size
        self.num_prefix_queries += len(seq.token_ids)
        self.num_prefix_hits += seq.num_computed_tokens
        return seq.num_computed_tokens

    def register_prefix(self, seq: Sequence, num_tokens: int) -> None:
        """Register the full blocks of seq's first num_tokens tokens (those computed once the step
        being scheduled has run; tokens not known yet are left out). Registered now, they may be
        reused by sequences scheduled later in the same step: every layer writes the whole step's
        keys and values before any attention reads them, and later steps run after it."""
        if not self.enable_prefix_caching or seq.cache_salt is None:
            return
        full = min(num_tokens, len(seq.token_ids)) // self.block_size
        if full <= seq.num_registered_blocks:
            return
        hashes = self._block_hashes(seq, full)
        for i in range(seq.num_registered_blocks, full):
            block = seq.block_table[i]
            if hashes[i] not in self._block_of and block not in self._hash_of:
                self._block_of[hashes[i]] = block
                self._hash_of[block] = hashes[i]
        seq.num_registered_blocks = full

    def forget_uncomputed(self, seq: Sequence) -> None:
        """Take back the registrations of seq's blocks beyond what it has computed (their step did
        not run): nobody may find them in the cache before they are written."""
        keep = min(seq.num_computed_tokens, len(seq.token_ids)) // self.block_size
        for block in seq.block_table[keep:seq.num_registered_blocks]:
            digest = self._hash_of.get(block)
            if digest is not None and self._block_of.get(digest) == block:
                del self._block_of[digest], self._hash_of[block]
        seq.num_registered_blocks = min(seq.num_registered_blocks, keep)

    def _block_hashes(self, seq: Sequence, num_blocks: int) -> list[bytes]:
        """The chained hashes of seq's first num_blocks full blocks (each computed once per sequence)."""
        hashes = seq.block_hashes
        if hashes is None:
            hashes = seq.block_hashes = []
        size = self.block_size
        parent = hashes[-1] if hashes else hashlib.blake2b(repr(seq.cache_salt).encode(), digest_size=16).digest()
        for i in range(len(hashes), num_blocks):
            tokens = array("q", seq.token_ids[i * size:(i + 1) * size]).tobytes()
            parent = hashlib.blake2b(parent + tokens, digest_size=16).digest()
            hashes.append(parent)
        return hashes[:num_blocks]

    def _evict(self) -> int:
        block, _ = self._evictable.popitem(last=False)
        del self._block_of[self._hash_of.pop(block)]
        return block
