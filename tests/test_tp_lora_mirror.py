"""LoRA under tensor parallelism, without processes: a rank's packed slots are exactly its slice of
one device's, and rank 0's manager decisions, replayed from its messages, give every rank the same
CPU cache and slots."""

from __future__ import annotations

import pytest
import torch

from adapters import TINY_SHAPES, write_peft_adapter
from loraplex.core.lora.adapter import load_lora_adapter
from loraplex.core.lora.manager import LoRAManager
from loraplex.core.lora.slots import LoRASlotStacks
from loraplex.core.lora.targets import llama_lora_spec
from loraplex.core.parallel.lora_mirror import LoRAMirror, WorkerAdapters
from loraplex.errors import AdapterInvalidError
from loraplex.lora_request import LoRARequest

ALL_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
MAX_RANK = 16


def make_stacks(rank: int, size: int, num_kv_heads: int = 2, max_loras: int = 2) -> LoRASlotStacks:
    spec = llama_lora_spec(num_layers=2, hidden_size=64, num_heads=4, num_kv_heads=num_kv_heads, head_dim=16,
                           intermediate_size=128, tp_rank=rank, tp_size=size)
    return LoRASlotStacks(spec, max_loras=max_loras, max_lora_rank=MAX_RANK, dtype=torch.float32, device="cpu")


def shapes_for(num_kv_heads: int) -> dict:
    kv = 16 * num_kv_heads
    return dict(TINY_SHAPES, k_proj=(64, kv), v_proj=(64, kv))


@pytest.fixture
def requests(tmp_path):
    """Four adapters of ranks 4-16 and different targets, ids 1..4, for the 2-KV-head model."""
    specs = [(4, ("q_proj", "v_proj")), (8, ALL_TARGETS), (16, ("gate_proj", "down_proj")), (4, ("o_proj", "k_proj"))]
    return [LoRARequest(f"a{i}", i, str(write_peft_adapter(tmp_path / f"a{i}", rank=r, target_modules=t, seed=i)))
            for i, (r, t) in enumerate(specs, start=1)]


@pytest.mark.parametrize("num_kv_heads", [2, 1])   # 1: the KV head is replicated on both ranks
def test_rank_slots_are_slices_of_one_device_slots(tmp_path, num_kv_heads):
    request = LoRARequest("all", 1, str(write_peft_adapter(tmp_path / "all", rank=8, target_modules=ALL_TARGETS,
                                                           shapes=shapes_for(num_kv_heads), seed=5)))
    whole = make_stacks(0, 1, num_kv_heads)
    whole.write_slot(1, load_lora_adapter(request, whole.spec, max_lora_rank=MAX_RANK))
    for rank in range(2):
        stacks = make_stacks(rank, 2, num_kv_heads)
        stacks.write_slot(1, load_lora_adapter(request, stacks.spec, max_lora_rank=MAX_RANK))
        for target in stacks.spec.targets:
            a, b = whole.lora_a[target.name][:, 1], whole.lora_b[target.name][:, 1]   # [L, S*R, in], [L, out, R]
            offsets = whole.spec.target(target.name).slice_offsets
            expected_b = torch.cat([shard.take(b[:, lo:hi], 1)
                                    for shard, lo, hi in zip(target.out_shards, offsets, offsets[1:])], dim=1)
            torch.testing.assert_close(stacks.lora_a[target.name][:, 1], target.in_shard.take(a, 2), rtol=0, atol=0)
            torch.testing.assert_close(stacks.lora_b[target.name][:, 1], expected_b, rtol=0, atol=0)
        # The shards differ between the ranks where the layers do (q rows, MLP rows, o and down columns).
        assert stacks.spec.target("gate_up_proj").out_shards[0].start == 64 * rank


def test_manager_decisions_reach_the_other_rank(requests):
    messages = []
    mirror = LoRAMirror(messages.append)
    stacks = make_stacks(0, 2)
    stacks.on_change = mirror.slot_changed
    manager = LoRAManager(stacks, max_cpu_loras=2, served_model_name="tiny-base", cpu_cache=mirror.cpu_cache())
    worker = WorkerAdapters(make_stacks(1, 2), allow_pickle=False)

    def step(*loras):
        manager.activate(loras)
        manager.end_step()

    step(requests[0], requests[1])
    step(requests[2])                       # evicts a slot and a CPU entry
    manager.add_lora(requests[3])           # evicts a CPU entry
    manager.pin_lora(4)
    manager.remove_lora(3)                  # drops its CPU copy, clears its slot
    step(requests[0])                       # reloaded from disk
    assert {m[0] for m in messages} == {"load", "drop", "slot"}
    for message in messages:
        worker.handle(message)
    state = worker.state()
    assert {k: state[k] for k in ("cached", "slots")} == mirror.state()
    assert state["cached"] == sorted(manager._cpu) and state["unmirrored_loads"] == 0
    assert state["slot_ranks"] == stacks.slot_ranks.tolist()
    # The other rank's slots hold its own shard of the same adapters, as a fresh write would.
    fresh = make_stacks(1, 2)
    for slot, lora_id in mirror.state()["slots"].items():
        fresh.write_slot(slot, load_lora_adapter(requests[lora_id - 1], fresh.spec, max_lora_rank=MAX_RANK))
    for name in fresh.lora_a:
        assert torch.equal(worker.stacks.lora_a[name], fresh.lora_a[name])
        assert torch.equal(worker.stacks.lora_b[name], fresh.lora_b[name])


def test_a_sharded_rank_refuses_what_one_device_refuses(tmp_path):
    """Values beyond float16 once scaled, only in rows rank 0 does not hold: every rank refuses."""
    path = write_peft_adapter(tmp_path / "big", rank=4, target_modules=("gate_proj",), seed=1)
    from safetensors.torch import load_file, save_file
    tensors = load_file(path / "adapter_model.safetensors")
    name = "base_model.model.model.layers.0.mlp.gate_proj.lora_B.weight"
    tensors[name][100] = 1e5                # output row 100: rank 1's half of gate
    save_file(tensors, path / "adapter_model.safetensors")
    request = LoRARequest("big", 1, str(path))
    for rank, size in ((0, 1), (0, 2), (1, 2)):
        spec = make_stacks(rank, size).spec
        with pytest.raises(AdapterInvalidError, match="gate_proj.lora_B has values beyond the range of the "
                                                      "model's torch.float16"):
            load_lora_adapter(request, spec, max_lora_rank=MAX_RANK, served_model_name="tiny-base",
                              dtype=torch.float16)
