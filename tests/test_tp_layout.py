"""The tensor-parallel layout (what each rank holds) and the errors for sizes a model cannot take,
without starting any process."""

from __future__ import annotations

import multiprocessing

import pytest
import torch

from loraplex import LLM
from loraplex.core.lora.targets import llama_lora_spec
from loraplex.core.parallel.layout import LayerShards, Shard, check_tensor_parallel_size, vocab_shard
from loraplex.core.parallel.runner import check_gpu_count
from loraplex.errors import ConfigError

LLAMA3_8B = dict(hidden_size=4096, num_heads=32, num_kv_heads=8, head_dim=128, intermediate_size=14336)
LLAMA3_70B = dict(hidden_size=8192, num_heads=64, num_kv_heads=8, head_dim=128, intermediate_size=28672)


def covered(shards: list[Shard]) -> list[int]:
    """Every entry of the full dim, in rank order, as the ranks hold them (replicas repeated)."""
    return [i for s in shards for i in range(s.start, s.start + s.num_valid)]


@pytest.mark.parametrize("shape, size", [(LLAMA3_8B, 2), (LLAMA3_8B, 4), (LLAMA3_8B, 8), (LLAMA3_70B, 4),
                                         (LLAMA3_70B, 16)])
def test_ranks_split_heads_and_mlp_exactly(shape, size):
    ranks = [LayerShards.for_rank(**shape, rank=r, size=size) for r in range(size)]
    assert covered([s.q_heads for s in ranks]) == list(range(shape["num_heads"]))
    assert covered([s.intermediate for s in ranks]) == list(range(shape["intermediate_size"]))
    kv = [s.kv_heads for s in ranks]
    if size <= shape["num_kv_heads"]:
        assert covered(kv) == list(range(shape["num_kv_heads"]))
    else:   # replicated: each KV head on size / num_kv_heads ranks, the one its query heads read
        assert all(s.size == 1 for s in kv)
        group = shape["num_heads"] // shape["num_kv_heads"]
        for s in ranks:
            assert {q // group for q in range(s.q_heads.start, s.q_heads.start + s.q_heads.size)} == {s.kv_heads.start}
    for s in ranks:   # column-parallel q/k/v and gate/up, row-parallel o and down
        qkv, o = s.projection("qkv_proj"), s.projection("o_proj")
        assert qkv.in_shard.is_whole and qkv.out_shards[0] == o.in_shard == s.q_heads.scaled(128)
        assert qkv.out_shards[1] == qkv.out_shards[2] == s.kv_heads.scaled(128)
        down, gate_up = s.projection("down_proj"), s.projection("gate_up_proj")
        assert down.in_shard == gate_up.out_shards[0] == gate_up.out_shards[1] == s.intermediate
        assert down.out_shards[0].is_whole and o.out_shards[0].is_whole


def test_one_rank_holds_everything():
    shards = LayerShards.for_rank(**LLAMA3_8B)
    for name in ("qkv_proj", "o_proj", "gate_up_proj", "down_proj"):
        projection = shards.projection(name)
        assert projection.in_shard.is_whole and all(s.is_whole for s in projection.out_shards)
    assert vocab_shard(128256, 0, 1).is_whole


def test_vocab_shards_pad_the_last_rank():
    shards = [vocab_shard(301, r, 2) for r in range(2)]
    assert [(s.start, s.size, s.num_valid) for s in shards] == [(0, 151, 151), (151, 151, 150)]
    assert covered(shards) == list(range(301))
    weight = torch.arange(301 * 2).view(301, 2)
    assert torch.equal(shards[1].take(weight, 0), weight[151:])


def test_lora_targets_shard_like_the_layers():
    spec = llama_lora_spec(num_layers=1, **LLAMA3_8B, tp_rank=1, tp_size=2)
    qkv, o = spec.target("qkv_proj"), spec.target("o_proj")
    assert qkv.in_features == 4096 and qkv.slice_sizes == (2048, 512, 512) and qkv.slice_offsets == (0, 2048, 2560, 3072)
    assert o.in_features == 2048 and o.slice_sizes == (4096,) and o.in_shard.start == 2048
    # Adapters are validated against the whole PEFT shapes.
    assert spec.peft_module_shape("k_proj") == (4096, 1024) and spec.peft_module_shape("down_proj") == (14336, 4096)
    assert not qkv.is_whole and llama_lora_spec(num_layers=1, **LLAMA3_8B).target("qkv_proj").is_whole


@pytest.mark.parametrize("size, heads, kv_heads, intermediate, message", [
    (3, 32, 8, 14336, "tensor_parallel_size=3 does not divide the model's 32 attention heads"),
    (4, 32, 8, 102, "does not divide the model's intermediate_size 102"),
    (4, 24, 6, 96, "neither divides the model's 6 KV heads nor is a multiple of them"),
])
def test_sizes_a_model_cannot_take_say_which_work(size, heads, kv_heads, intermediate, message):
    with pytest.raises(ConfigError, match=message) as error:
        check_tensor_parallel_size(size, num_heads=heads, num_kv_heads=kv_heads, intermediate_size=intermediate)
    assert "this model splits over 1, " in str(error.value)
    if heads == 24:
        assert "over 1, 2, 3, 6, 12, 24 ranks" in str(error.value)


def test_more_ranks_than_gpus_is_refused():
    check_gpu_count(4, available=4)
    with pytest.raises(ConfigError, match="tensor_parallel_size=4 needs 4 GPUs but 2 are visible"):
        check_gpu_count(4, available=2)


def test_llm_refuses_a_bad_size_before_starting_processes(tiny_checkpoint):
    path = str(tiny_checkpoint())
    before = multiprocessing.active_children()
    with pytest.raises(ConfigError, match="tensor_parallel_size=3 does not divide the model's 4 attention heads "
                                          "or its intermediate_size 128; this model splits over 1, 2, 4 ranks"):
        LLM(path, tensor_parallel_size=3, device="cpu")
    with pytest.raises(ConfigError, match="tensor_parallel_size must be >= 1, got 0"):
        LLM(path, tensor_parallel_size=0, device="cpu")
    with pytest.raises(ConfigError, match="distributed_timeout_seconds must be positive"):
        LLM(path, tensor_parallel_size=2, device="cpu", distributed_timeout_seconds=0)
    assert multiprocessing.active_children() == before
