"""What each rank of a tensor-parallel group holds of a Llama-family model (Megatron-style).

    qkv_proj, gate_up_proj  column-parallel: each rank holds a slice of every output part
                            (its query heads, its KV heads, its rows of gate and of up) and
                            the whole input; no communication
    o_proj, down_proj       row-parallel: each rank holds the input columns matching its
                            heads / intermediate rows and produces a partial sum, all-reduced
    embed_tokens, lm_head   vocab-parallel: each rank holds ceil(vocab / size) rows (the last
                            padded with zeros); lookups are all-reduced, logits all-gathered

KV heads are split like query heads when there are at least as many as ranks. With fewer
(e.g. 8 KV heads over 16 ranks, or 1 over 2), each rank holds the one KV head its query heads
read, so a KV head is replicated on size / num_kv_heads ranks (its K/V computed and cached on
each). A `Shard` is the layout's unit: rows [start, start + size) of a dimension of `full`.
With one rank every shard is whole and the model is exactly the single-device one.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from loraplex.errors import ConfigError


@dataclass(frozen=True)
class Shard:
    """Entries [start, start + size) of a dimension of `full` entries held by one rank.
    Only the vocab's last shard may run past `full` (padding rows, which stay zero)."""
    start: int
    size: int
    full: int

    @classmethod
    def whole(cls, n: int) -> "Shard":
        return cls(0, n, n)

    @property
    def is_whole(self) -> bool:
        return self.start == 0 and self.size == self.full

    def scaled(self, factor: int) -> "Shard":
        """Heads -> features: a shard of heads as a shard of head_dim-wide rows."""
        return Shard(self.start * factor, self.size * factor, self.full * factor)

    @property
    def num_valid(self) -> int:
        """Entries of the shard that exist in the full tensor (less than size only for padding)."""
        return max(0, min(self.size, self.full - self.start))

    def take(self, tensor: torch.Tensor, dim: int) -> torch.Tensor:
        """The shard's part of a full tensor along `dim` (a view; padding rows are not in it)."""
        return tensor.narrow(dim, self.start, self.num_valid)


@dataclass(frozen=True)
class ProjectionShards:
    """One linear layer's shards: of its input, and of each output part (q, k, v / gate, up)."""
    in_shard: Shard
    out_shards: tuple[Shard, ...]


def split(n: int, rank: int, size: int) -> Shard:
    """The rank's equal part of n entries (size divides n: check_tensor_parallel_size)."""
    part = n // size
    return Shard(rank * part, part, n)


def vocab_shard(vocab_size: int, rank: int, size: int) -> Shard:
    """ceil(vocab / size) rows per rank: any vocab size splits, the last shard padded."""
    part = -(-vocab_size // size)
    return Shard(rank * part, part, vocab_size)


@dataclass(frozen=True)
class LayerShards:
    """What one rank holds of every decoder layer (the layers are all alike)."""
    rank: int
    size: int
    hidden_size: int
    head_dim: int
    q_heads: Shard
    kv_heads: Shard
    intermediate: Shard

    @classmethod
    def for_rank(cls, *, hidden_size: int, num_heads: int, num_kv_heads: int, head_dim: int,
                 intermediate_size: int, rank: int = 0, size: int = 1) -> "LayerShards":
        check_tensor_parallel_size(size, num_heads=num_heads, num_kv_heads=num_kv_heads,
                                   intermediate_size=intermediate_size)
        if num_kv_heads >= size:
            kv_heads = split(num_kv_heads, rank, size)
        else:   # replicated: the KV head of this rank's query heads (size / num_kv_heads ranks share it)
            kv_heads = Shard(rank * num_kv_heads // size, 1, num_kv_heads)
        return cls(rank, size, hidden_size, head_dim, split(num_heads, rank, size), kv_heads,
                   split(intermediate_size, rank, size))

    @classmethod
    def for_config(cls, cfg, rank: int = 0, size: int = 1) -> "LayerShards":
        """From a ModelConfig."""
        return cls.for_rank(hidden_size=cfg.hidden_size, num_heads=cfg.num_heads, num_kv_heads=cfg.num_kv_heads,
                            head_dim=cfg.head_dim, intermediate_size=cfg.intermediate_size, rank=rank, size=size)

    def projection(self, name: str) -> ProjectionShards:
        """Shards of qkv_proj, o_proj, gate_up_proj or down_proj."""
        hidden = Shard.whole(self.hidden_size)
        q, kv = self.q_heads.scaled(self.head_dim), self.kv_heads.scaled(self.head_dim)
        if name == "qkv_proj":
            return ProjectionShards(hidden, (q, kv, kv))
        if name == "o_proj":
            return ProjectionShards(q, (hidden,))
        if name == "gate_up_proj":
            return ProjectionShards(hidden, (self.intermediate, self.intermediate))
        if name == "down_proj":
            return ProjectionShards(self.intermediate, (hidden,))
        raise KeyError(name)


def valid_tensor_parallel_sizes(*, num_heads: int, num_kv_heads: int, intermediate_size: int) -> list[int]:
    return [n for n in range(1, num_heads + 1)
            if not num_heads % n and not intermediate_size % n and (not num_kv_heads % n or not n % num_kv_heads)]


def check_tensor_parallel_size(size: int, *, num_heads: int, num_kv_heads: int, intermediate_size: int) -> None:
    """Raise ConfigError unless the model splits over `size` ranks: size must divide the attention
    heads and the MLP width, and divide the KV heads or be a multiple of them (replication)."""
    problems = []
    if num_heads % size:
        problems.append(f"{num_heads} attention heads")
    if intermediate_size % size:
        problems.append(f"intermediate_size {intermediate_size}")
    if problems:
        what = f"does not divide the model's {' or its '.join(problems)}"
    elif num_kv_heads % size and size % num_kv_heads:
        what = (f"neither divides the model's {num_kv_heads} KV heads nor is a multiple of them "
                f"(each rank needs whole KV heads, replicated when there are fewer than ranks)")
    else:
        return
    valid = valid_tensor_parallel_sizes(num_heads=num_heads, num_kv_heads=num_kv_heads,
                                        intermediate_size=intermediate_size)
    raise ConfigError(f"tensor_parallel_size={size} {what}; this model splits over "
                      f"{', '.join(map(str, valid))} ranks")
