"""Device slot stacks and the two LRU caches: layout, eviction, pinning, capacity, removal."""

from __future__ import annotations

import gc
import json
import weakref
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from adapters import write_peft_adapter
from loraplex.core.lora.manager import LoRAManager
from loraplex.core.lora.slots import LoRASlotStacks
from loraplex.core.lora.targets import PEFT_MODULE_TO_PACKED, llama_lora_spec
from loraplex.errors import AdapterCapacityError, AdapterInvalidError, AdapterNotFoundError
from loraplex.lora_request import LoRARequest

SPEC = llama_lora_spec(num_layers=2, hidden_size=64, num_heads=4, num_kv_heads=2, head_dim=16,
                       intermediate_size=128)
MAX_RANK = 16


def make_manager(max_loras=2, max_cpu_loras=3):
    stacks = LoRASlotStacks(SPEC, max_loras=max_loras, max_lora_rank=MAX_RANK, dtype=torch.float32, device="cpu")
    return LoRAManager(stacks, max_cpu_loras=max_cpu_loras, served_model_name="tiny-base")


@pytest.fixture
def requests(tmp_path):
    """Five adapters of different ranks and targets, ids 1..5."""
    shapes = [(4, ("q_proj", "v_proj")), (8, ("k_proj", "o_proj")), (16, ("gate_proj", "down_proj")),
              (4, ("up_proj",)), (8, ("q_proj", "k_proj", "v_proj", "o_proj"))]
    return [LoRARequest(f"a{i}", i, str(write_peft_adapter(tmp_path / f"a{i}", rank=r, target_modules=t, seed=i)))
            for i, (r, t) in enumerate(shapes, start=1)]


def test_write_slot_layout_and_zeroing(requests):
    manager = make_manager()
    stacks = manager.stacks
    slots = manager.activate([requests[4]])     # rank 8 on q, k, v, o
    slot = slots[5]
    adapter = manager._cpu[5]
    qkv = stacks.stack(1, "qkv_proj")
    for i, module in enumerate(("q_proj", "k_proj", "v_proj")):
        a, _ = adapter.module_weights(1, module)
        torch.testing.assert_close(qkv.lora_a[slot, i * MAX_RANK: i * MAX_RANK + 8], a)
        assert qkv.lora_a[slot, i * MAX_RANK + 8: (i + 1) * MAX_RANK].abs().sum() == 0   # padding rows
    # k's B lands in the k output columns (64:96), padded to MAX_RANK with zeros
    torch.testing.assert_close(qkv.lora_b[slot, 64:96, :8], adapter.module_weights(1, "k_proj")[1])
    assert qkv.lora_b[slot, :, 8:].abs().sum() == 0
    assert stacks.slot_rank(slot) == 8 and int(stacks.slot_ranks[slot]) == 8
    manager.end_step()

    # Reusing the slot for an adapter with other targets leaves nothing of the old one behind.
    manager.remove_lora(5)
    manager.activate([requests[2]])              # rank 16 on gate, down
    assert manager.slot_of(3) == slot
    assert qkv.lora_a[slot].abs().sum() == 0 and qkv.lora_b[slot].abs().sum() == 0
    assert stacks.stack(0, "down_proj").lora_b[slot].abs().sum() > 0
    assert stacks.slot_rank(slot) == 16


def reference_slot(request: LoRARequest, dtype: torch.dtype) -> dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]:
    """One adapter's slot contents, built slice by slice from its files: (layer, target) -> (A, B)."""
    config = json.loads(Path(request.lora_path, "adapter_config.json").read_text())
    raw = load_file(str(Path(request.lora_path, "adapter_model.safetensors")))
    slot = {(layer, t.name): (torch.zeros(t.num_slices * MAX_RANK, t.in_features, dtype=dtype),
                              torch.zeros(t.out_features, MAX_RANK, dtype=dtype))
            for layer in range(SPEC.num_layers) for t in SPEC.targets}
    for name, a in raw.items():
        if ".lora_A." not in name:
            continue
        layer, module = int(name.split(".layers.")[1].split(".")[0]), name.split(".")[-3]
        packed, index = PEFT_MODULE_TO_PACKED[module]
        offsets, rank = SPEC.target(packed).slice_offsets, a.shape[0]
        slot_a, slot_b = slot[(layer, packed)]
        slot_a[index * MAX_RANK: index * MAX_RANK + rank] = a.to(dtype)
        scaled = raw[name.replace(".lora_A.", ".lora_B.")].float() * (config["lora_alpha"] / config["r"])
        slot_b[offsets[index]:offsets[index + 1], :rank] = scaled.to(dtype)
    return slot


def test_write_slot_matches_a_slice_by_slice_copy_and_leaves_nothing_stale(requests):
    # bf16 slots: the packed copy is already in the model dtype. One slot takes adapters of
    # falling and rising rank and other targets in turn (rank 16 gate/down, 8 q/k/v/o, 4 q/v,
    # 16 gate/down, 4 up, 8 k/o); the other slot's adapter must stay untouched throughout.
    stacks = LoRASlotStacks(SPEC, max_loras=2, max_lora_rank=MAX_RANK, dtype=torch.bfloat16, device="cpu")
    manager = LoRAManager(stacks, max_cpu_loras=5, served_model_name="tiny-base")
    for r in requests:
        manager.add_lora(r)
    # Packed in the slots' dtype when loaded; plain memory for CPU slots (pinned only for a GPU).
    assert all(t.dtype == torch.bfloat16 and not t.is_pinned()
               for a in manager._cpu.values() for p in a.targets.values() for t in (p.lora_a, p.lora_b))
    stacks.write_slot(0, manager._cpu[2])
    neighbour = reference_slot(requests[1], torch.bfloat16)
    for index in (2, 4, 0, 2, 3, 1):
        stacks.write_slot(1, manager._cpu[requests[index].lora_int_id])
        expected = reference_slot(requests[index], torch.bfloat16)
        for (layer, target), (a, b) in expected.items():
            stack = stacks.stack(layer, target)
            assert torch.equal(stack.lora_a[1], a) and torch.equal(stack.lora_b[1], b), (index, layer, target)
            assert torch.equal(stack.lora_a[0], neighbour[(layer, target)][0])
            assert torch.equal(stack.lora_b[0], neighbour[(layer, target)][1])
        assert stacks.slot_rank(1) == int(stacks.slot_ranks[1]) == manager._cpu[requests[index].lora_int_id].rank
    ranks = stacks.slot_ranks
    stacks.clear_slot(1)
    assert stacks.slot_ranks is ranks and ranks.tolist() == [8, 0]   # written in place: CUDA graphs read it
    assert all(stacks.stack(layer, t.name).lora_a[1].abs().sum() == 0 == stacks.stack(layer, t.name).lora_b[1].abs().sum()
               for layer in range(SPEC.num_layers) for t in SPEC.targets)


def test_slot_stacks_share_one_tensor_per_target(requests):
    stacks = LoRASlotStacks(SPEC, max_loras=3, max_lora_rank=MAX_RANK, dtype=torch.float32, device="cpu")
    for layer in range(SPEC.num_layers):
        for t in SPEC.targets:
            stack = stacks.stack(layer, t.name)
            # What the kernels get: contiguous [max_loras, ...] views of the all-layer tensors.
            assert stack.lora_a.shape == (3, t.num_slices * MAX_RANK, t.in_features) and stack.lora_a.is_contiguous()
            assert stack.lora_b.shape == (3, t.out_features, MAX_RANK) and stack.lora_b.is_contiguous()
            assert stack.lora_a.data_ptr() == stacks.lora_a[t.name][layer].data_ptr()
            assert stack.lora_b.data_ptr() == stacks.lora_b[t.name][layer].data_ptr()
    assert stacks.num_bytes == 4 * 3 * MAX_RANK * SPEC.num_layers * (7 * 64 + 2 * 64 + 2 * 32 + 3 * 128)


def test_device_lru_eviction_keeps_the_step(requests):
    manager = make_manager(max_loras=2, max_cpu_loras=5)
    first = manager.activate([requests[0], requests[1]])
    manager.end_step()
    manager.activate([requests[0]])             # a1 is now more recent than a2
    manager.end_step()
    slots = manager.activate([requests[0], requests[2]])
    manager.end_step()
    assert manager.slot_of(2) is None           # a2 was the least recently used
    assert dict(manager.stats) == {"device_hits": 2, "cpu_hits": 0, "cpu_misses": 3, "loads": 3,
                                   "cpu_evictions": 0, "device_evictions": 1}
    assert slots[3] == first[2] and slots[1] == first[1]
    with pytest.raises(AdapterCapacityError, match="max_loras"):
        manager.activate(requests[:3])


def test_cpu_lru_and_reload(requests):
    manager = make_manager(max_loras=2, max_cpu_loras=3)
    for r in requests[:4]:
        manager.add_lora(r)
    assert manager.list_loras() == {2, 3, 4}    # a1 evicted from the CPU cache
    assert manager.add_lora(requests[3]) is False
    slots = manager.activate([requests[0]])     # reloaded from disk on demand
    manager.end_step()
    assert 1 in manager.list_loras() and slots[1] in (0, 1)


def test_a_load_during_a_step_evicts_a_step_adapter_already_in_its_slot(requests):
    # max_cpu_loras == max_loras (the default) and the step uses every slot: a request for a new
    # adapter arriving mid-step (the async engine loads it on another thread) still finds room.
    manager = make_manager(max_loras=2, max_cpu_loras=2)
    slots = manager.activate(requests[:2])
    assert manager.add_lora(requests[2])
    assert list(manager._cpu) == [2, 3]                                      # 1 was least recently used
    assert {manager.slot_of(1), manager.slot_of(2)} == set(slots.values())   # the step keeps its slots
    manager.end_step()
    assert manager.is_loaded(requests[0])         # in its slot: a new request for it loads nothing
    # Adapter 1 still runs from its slot, with no reload from disk.
    misses, hits = manager.stats["cpu_misses"], manager.stats["device_hits"]
    assert manager.activate([requests[0]]) == {1: slots[1]}
    manager.end_step()
    assert manager.stats["cpu_misses"] == misses and manager.stats["device_hits"] == hits + 1


def test_pinning_survives_pressure(requests):
    manager = make_manager(max_loras=2, max_cpu_loras=3)
    manager.add_lora(requests[0])
    manager.pin_lora(1)
    assert manager.slot_of(1) is not None       # a pinned adapter takes a slot at once
    for r in requests[1:]:
        manager.add_lora(r)
        manager.activate([r])
        manager.end_step()
    assert 1 in manager.list_loras() and manager.slot_of(1) is not None
    assert not manager.can_run_together([2, 3])      # one slot is the pinned adapter's
    assert manager.can_run_together([1, 3])
    with pytest.raises(AdapterCapacityError, match="only 2 device slots exist"):
        manager.activate(requests[1:4])
    # A step that only fits by taking the pinned slot (a pin that raced with admission) still
    # runs; the pinned adapter stays pinned and gets a slot again when it is next used.
    assert set(manager.activate([requests[1], requests[2]]).values()) == {0, 1}
    manager.end_step()
    assert manager.is_pinned(1) and manager.slot_of(1) is None
    assert manager.activate([requests[0]])[1] in (0, 1)
    manager.end_step()


def test_pin_waits_for_a_slot_the_latest_step_uses(requests):
    manager = make_manager(max_loras=2, max_cpu_loras=5)
    manager.activate(requests[:2])
    manager.end_step()
    manager.add_lora(requests[2])
    manager.pin_lora(3)
    # Both slots hold adapters of the latest step (their sequences are probably still running).
    assert manager.slot_of(3) is None and manager.is_pinned(3)
    manager.activate([requests[2]])
    manager.end_step()
    assert manager.slot_of(3) is not None and manager.slot_of(1) is None   # a1 was least recently used
    manager.add_lora(requests[0])
    manager.pin_lora(1)
    with pytest.raises(AdapterCapacityError, match="all 2 device slots are pinned"):
        manager.pin_lora(2)
    with pytest.raises(AdapterCapacityError, match="could never run"):
        manager.check_servable(2)
    manager.check_servable(1)
    with pytest.raises(AdapterNotFoundError, match="add_lora"):
        manager.pin_lora(99)


def test_cpu_capacity_error_when_all_pinned(requests):
    manager = make_manager(max_loras=2, max_cpu_loras=2)
    for r in requests[:2]:
        manager.add_lora(r)
        manager.pin_lora(r.lora_int_id)
    with pytest.raises(AdapterCapacityError, match="max_cpu_loras"):
        manager.add_lora(requests[2])
    assert manager.list_loras() == {1, 2}


def test_remove_frees_slot_and_memory(requests):
    manager = make_manager(max_loras=2, max_cpu_loras=3)
    manager.add_lora(requests[2])
    manager.pin_lora(3)
    slot = manager.slot_of(3)
    cpu_tensor = weakref.ref(manager._cpu[3].targets["down_proj"].lora_b)
    assert manager.stacks.stack(0, "down_proj").lora_b[slot].abs().sum() > 0
    assert manager.remove_lora(3) is True
    gc.collect()
    assert cpu_tensor() is None                  # the CPU copy is gone
    assert 3 not in manager.list_loras() and manager.slot_of(3) is None and not manager.is_pinned(3)
    assert manager.stacks.stack(0, "down_proj").lora_b[slot].abs().sum() == 0
    assert manager.stacks.slot_rank(slot) == 0
    assert manager.remove_lora(3) is False
    # Both slots are usable again, including the one freed.
    assert set(manager.activate(requests[:2]).values()) == {0, 1}


def test_remove_during_step_is_refused(requests):
    manager = make_manager()
    manager.activate([requests[0]])
    with pytest.raises(AdapterCapacityError, match="step now running"):
        manager.remove_lora(1)
    manager.end_step()
    assert manager.remove_lora(1)


def test_id_name_and_path_clashes(requests, tmp_path):
    manager = make_manager()
    manager.add_lora(requests[0])
    with pytest.raises(AdapterInvalidError, match="already used by adapter 'a1'"):
        manager.add_lora(LoRARequest("other", 1, requests[1].lora_path))
    # The id is loaded from another path: never "already cached" with the other weights.
    with pytest.raises(AdapterInvalidError, match="loaded as lora_int_id 1 from .*a1'.*new lora_int_id"):
        manager.add_lora(LoRARequest("a1", 1, requests[1].lora_path))
    # A new version of a name under a new id is a second adapter (load_inplace's new version).
    assert manager.add_lora(LoRARequest("a1", 7, requests[1].lora_path))
    assert manager.list_loras() == {1, 7} and manager.find_by_name("a1").lora_int_id == 7


def test_id_clash_with_an_adapter_only_left_in_a_slot(requests):
    manager = make_manager(max_loras=2, max_cpu_loras=2)
    manager.activate([requests[0]])
    manager.end_step()
    manager.add_lora(requests[1])
    manager.add_lora(requests[2])               # evicts a1 from the CPU cache; its slot keeps it
    assert manager.slot_of(1) is not None and manager.get_request(1) is None
    assert manager.find_by_name("a1") == requests[0]
    with pytest.raises(AdapterInvalidError, match="already used by adapter 'a1'"):
        manager.add_lora(LoRARequest("impostor", 1, requests[3].lora_path))


def test_invalid_adapter_leaves_caches_untouched(requests, tmp_path):
    manager = make_manager(max_loras=2, max_cpu_loras=2)
    manager.add_lora(requests[0])
    manager.add_lora(requests[1])
    bad = write_peft_adapter(tmp_path / "bad", rank=4, use_dora=True)
    with pytest.raises(AdapterInvalidError, match="DoRA"):
        manager.add_lora(LoRARequest("bad", 9, str(bad)))
    assert manager.list_loras() == {1, 2}    # nothing was evicted for the rejected adapter


def test_served_names_count_as_the_base_model(tmp_path):
    manager = make_manager()
    path = write_peft_adapter(tmp_path / "a", rank=4, base_model_name_or_path="my-served-name")
    with pytest.raises(AdapterInvalidError, match="trained for base model 'my-served-name'"):
        manager.add_lora(LoRARequest("a", 1, str(path)))
    manager.add_served_names(["my-served-name"])
    assert manager.add_lora(LoRARequest("a", 1, str(path)))


def test_cpu_cache_and_slots_hold_download_cache_entries(tmp_path):
    from loraplex.resolvers.cache import AdapterCache
    from loraplex.resolvers.holds import is_held_here
    from test_cache import CountingSource
    for i, name in enumerate(["x", "y", "z"]):
        write_peft_adapter(tmp_path / "store" / name, rank=4, seed=i)
    cache, source = AdapterCache(tmp_path / "cache"), CountingSource(tmp_path / "store")
    x, y, z = (LoRARequest(n, i, str(cache.get(n, source))) for i, n in enumerate("xyz", start=1))
    manager = make_manager(max_loras=1, max_cpu_loras=1)
    manager.add_lora(x)
    assert is_held_here(x.lora_path)
    manager.activate([y])                           # y evicts x from the CPU cache; x had no slot
    manager.end_step()
    assert not is_held_here(x.lora_path) and is_held_here(y.lora_path)
    manager.add_lora(z)                             # y leaves the CPU cache but keeps its slot
    assert manager.get_request(2) is None and is_held_here(y.lora_path)
    manager.activate([z])                           # ... until z takes the slot
    manager.end_step()
    assert not is_held_here(y.lora_path) and is_held_here(z.lora_path)
    manager.remove_lora(3)
    assert not any(is_held_here(r.lora_path) for r in (x, y, z))
    with pytest.raises(AdapterInvalidError):        # a failed load leaves no hold behind
        manager.add_lora(LoRARequest("x2", 9, str(tmp_path / "nowhere")))
    assert not is_held_here(tmp_path / "nowhere")


def test_replace_keeps_the_old_version_for_its_requests_outside_the_bound(requests, tmp_path):
    manager = make_manager(max_loras=1, max_cpu_loras=1)
    old = requests[0]
    manager.add_lora(old)
    new = LoRARequest("a1", 11, requests[4].lora_path)
    bad = LoRARequest("a1", 12, str(write_peft_adapter(tmp_path / "bad", rank=64)))
    with pytest.raises(AdapterInvalidError, match="rank 64"):
        manager.replace_lora(1, bad)
    assert manager.find_by_name("a1").lora_int_id == 1 and manager.list_loras() == {1}   # nothing changed
    assert manager.replace_lora(1, new)
    assert manager.find_by_name("a1").lora_int_id == 11 and manager.list_loras() == {1, 11}
    # The old version takes no room: another adapter evicts the new one, never the old one,
    # and a request still running on the old id is served from its CPU copy, not reloaded.
    manager.add_lora(requests[1])
    assert manager.list_loras() == {1, 2}
    loads = manager.stats["loads"]
    manager.activate([old])
    manager.end_step()
    assert manager.stats["loads"] == loads and manager.stats["cpu_hits"] == 1
    assert manager.remove_lora(1) and manager.list_loras() == {2}


def test_host_buffer_reservations_cover_the_cpu_cache_within_a_memory_bound(monkeypatch):
    """The engine loop reserves a buffer per adapter the CPU cache holds, each the size of the
    largest adapter the slots take (host_buffer.py), but no more memory than the bound."""
    from loraplex.core.lora import manager as manager_module
    from loraplex.core.lora.adapter import largest_packed_nbytes
    manager = make_manager(max_loras=2, max_cpu_loras=5)
    nbytes = largest_packed_nbytes(SPEC, MAX_RANK, torch.float32)
    reservations = manager.host_buffer_reservations()
    assert len(reservations) == 5
    assert {(r.args, r.keywords["up_to"]) for r in reservations} == {((nbytes,), 5)}
    monkeypatch.setattr(manager_module, "RESERVED_HOST_MAX_BYTES", 3 * nbytes + 1)
    assert len(manager.host_buffer_reservations()) == 3
