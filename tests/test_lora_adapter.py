"""Loading a PEFT adapter directory: layout, scaling, and every validation rule."""

from __future__ import annotations

import gc
import json
import logging
import math

import pytest
import torch
from safetensors.torch import load_file, save_file

from adapters import write_peft_adapter
from loraplex.core.lora.adapter import largest_packed_nbytes, load_lora_adapter
from loraplex.core.lora.host_buffer import HostBuffer
from loraplex.core.lora.safetensors_file import SafetensorsFile
from loraplex.core.lora.targets import llama_lora_spec
from loraplex.errors import AdapterInvalidError
from loraplex.lora_request import LoRARequest
from loraplex.resolvers.validation import validate_adapter_dir

ALL_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

# Matches tests/adapters.py TINY_SHAPES: q 64, k/v 32, intermediate 128, 2 layers.
SPEC = llama_lora_spec(num_layers=2, hidden_size=64, num_heads=4, num_kv_heads=2, head_dim=16,
                       intermediate_size=128)


def load(path, *, max_lora_rank=16, served="tiny-base", allow_pickle=False, base_model_name=None,
         dtype=torch.float32):
    request = LoRARequest("a", 1, str(path), base_model_name=base_model_name)
    return load_lora_adapter(request, SPEC, max_lora_rank=max_lora_rank, served_model_name=served,
                             allow_pickle=allow_pickle, dtype=dtype)


def edit_config(path, **changes):
    config_path = path / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config.update(changes)
    config_path.write_text(json.dumps(config))


def edit_tensors(path, change):
    tensors = load_file(str(path / "adapter_model.safetensors"))
    change(tensors)
    save_file(tensors, str(path / "adapter_model.safetensors"))


def test_packs_slices_and_folds_scaling(tmp_path):
    path = write_peft_adapter(tmp_path / "a", rank=4, alpha=8, target_modules=("k_proj", "up_proj"))
    raw = load_file(str(path / "adapter_model.safetensors"))
    adapter = load(path)
    assert adapter.rank == 4
    assert set(adapter.module_ranks) == {(0, "k_proj"), (1, "k_proj"), (0, "up_proj"), (1, "up_proj")}
    assert set(adapter.targets) == {"qkv_proj", "gate_up_proj"}          # o_proj and down_proj not adapted
    assert adapter.module_weights(1, "q_proj") is None and adapter.module_weights(1, "v_proj") is None
    prefix = "base_model.model.model.layers.1.self_attn.k_proj"
    a, b = adapter.module_weights(1, "k_proj")
    torch.testing.assert_close(a, raw[f"{prefix}.lora_A.weight"])
    torch.testing.assert_close(b, raw[f"{prefix}.lora_B.weight"] * (8 / 4))
    assert adapter.module_weights(0, "up_proj")[1].shape == (128, 4)


def test_packed_layout_is_the_slot_layout(tmp_path):
    """Per target one A [layers, slices*rank, in] and B [layers, out, rank] in the model dtype; every
    slice in its rows/columns, zeros where nothing is adapted; num_bytes counts what is held."""
    path = write_peft_adapter(tmp_path / "a", rank=4, alpha=8, target_modules=("k_proj", "v_proj", "down_proj"))
    key = "base_model.model.model.layers.1.self_attn.v_proj"
    gen = torch.Generator().manual_seed(2)
    a8, b8 = torch.randn(8, 64, generator=gen), torch.randn(32, 8, generator=gen)
    edit_tensors(path, lambda t: t.update({f"{key}.lora_A.weight": a8, f"{key}.lora_B.weight": b8}))
    edit_config(path, rank_pattern={"layers.1.self_attn.v_proj": 8})
    raw = load_file(str(path / "adapter_model.safetensors"))
    adapter = load(path, dtype=torch.bfloat16)
    assert adapter.rank == 8 and set(adapter.targets) == {"qkv_proj", "down_proj"}
    qkv = adapter.targets["qkv_proj"]
    assert qkv.lora_a.shape == (2, 3 * 8, 64) and qkv.lora_b.shape == (2, 128, 8)
    assert qkv.lora_a.dtype == qkv.lora_b.dtype == torch.bfloat16 and not qkv.lora_a.is_pinned()
    for layer in range(2):
        k_rank, v_rank = 4, (8 if layer == 1 else 4)
        k = f"base_model.model.model.layers.{layer}.self_attn.k_proj"
        v = f"base_model.model.model.layers.{layer}.self_attn.v_proj"
        assert qkv.lora_a[layer, 0:8].abs().sum() == 0 and qkv.lora_b[layer, 0:64].abs().sum() == 0   # q
        torch.testing.assert_close(qkv.lora_a[layer, 8:8 + k_rank], raw[f"{k}.lora_A.weight"].bfloat16())
        assert qkv.lora_a[layer, 8 + k_rank:16].abs().sum() == 0                                     # k padding
        torch.testing.assert_close(qkv.lora_a[layer, 16:16 + v_rank], raw[f"{v}.lora_A.weight"].bfloat16())
        # scaling folded in float32, then rounded once: k alpha 8 / r 4, v rank 8 from the pattern: 8 / 8
        torch.testing.assert_close(qkv.lora_b[layer, 64:96, :k_rank], (raw[f"{k}.lora_B.weight"] * 2.0).bfloat16(),
                                   rtol=0, atol=0)
        assert qkv.lora_b[layer, 64:96, k_rank:].abs().sum() == 0
        torch.testing.assert_close(qkv.lora_b[layer, 96:128, :v_rank],
                                   (raw[f"{v}.lora_B.weight"] * (8 / v_rank)).bfloat16(), rtol=0, atol=0)
    down = adapter.targets["down_proj"]
    assert down.lora_a.shape == (2, 8, 128) and down.lora_b.shape == (2, 64, 8)
    assert down.lora_a[:, 4:].abs().sum() == 0 and down.lora_b[:, :, 4:].abs().sum() == 0
    held = sum(t.numel() * 2 for p in adapter.targets.values() for t in (p.lora_a, p.lora_b))
    assert adapter.num_bytes == held == 2 * 2 * (8 * (3 * 64 + 128) + 8 * (128 + 64))


def test_rslora_scaling(tmp_path):
    path = write_peft_adapter(tmp_path / "a", rank=16, alpha=8, target_modules=("o_proj",), use_rslora=True)
    raw = load_file(str(path / "adapter_model.safetensors"))
    _, b = load(path).module_weights(0, "o_proj")
    torch.testing.assert_close(b, raw["base_model.model.model.layers.0.self_attn.o_proj.lora_B.weight"] * (8 / math.sqrt(16)))


def test_rank_and_alpha_pattern(tmp_path):
    path = write_peft_adapter(tmp_path / "a", rank=4, alpha=4, target_modules=("q_proj", "v_proj"))
    # Give layer 1's v_proj rank 8 and alpha 32, the way PEFT writes rank_pattern adapters.
    key = "base_model.model.model.layers.1.self_attn.v_proj"
    gen = torch.Generator().manual_seed(1)
    a8, b8 = torch.randn(8, 64, generator=gen), torch.randn(32, 8, generator=gen)
    edit_tensors(path, lambda t: t.update({f"{key}.lora_A.weight": a8, f"{key}.lora_B.weight": b8}))
    edit_config(path, rank_pattern={"layers.1.self_attn.v_proj": 8}, alpha_pattern={"v_proj": 32})
    adapter = load(path)
    assert adapter.rank == 8
    torch.testing.assert_close(adapter.module_weights(1, "v_proj")[1], b8 * (32 / 8))
    # layer 0's v_proj: rank 4 from r, alpha 32 from the pattern
    a0, b0 = adapter.module_weights(0, "v_proj")
    assert a0.shape == (4, 64)
    raw0 = load_file(str(path / "adapter_model.safetensors"))["base_model.model.model.layers.0.self_attn.v_proj.lora_B.weight"]
    torch.testing.assert_close(b0, raw0 * (32 / 4))
    assert adapter.module_weights(0, "q_proj")[1].abs().sum() > 0


def test_pickle_weights_need_opt_in(tmp_path):
    path = write_peft_adapter(tmp_path / "a", rank=4)
    tensors = load_file(str(path / "adapter_model.safetensors"))
    (path / "adapter_model.safetensors").unlink()
    torch.save(tensors, path / "adapter_model.bin")
    with pytest.raises(AdapterInvalidError, match="pickle"):
        load(path)
    assert load(path, allow_pickle=True).rank == 4


@pytest.mark.parametrize("case, match", [
    ("rank", "above max_lora_rank=16"),
    ("dora", "DoRA"),
    ("modules_to_save", "modules_to_save"),
    ("bias", "bias='none'"),
    ("lora_bias", "lora_bias"),
    ("target_unsupported", "'lm_head', which loraplex does not adapt"),
    ("target_missing", "'c_attn', which does not exist in this model"),
    ("shape", r"has shape \[32, 4\], expected \[64, 4\]"),
    ("nan", "NaN or infinite"),
    ("base_model", "trained for base model 'org/other-model'"),
    ("request_base_model", "trained for base model 'yet-another'"),
    ("layers", "is for layer 2, but the model has 2 layers"),
    ("unexpected_name", "unexpected tensor 'base_model.model.model.layers.0.self_attn.q_proj.magnitude'"),
    ("embed_tensor", "adapts 'embed_tokens'"),
    ("missing_b", "has no lora_B weight"),
    ("wrong_parent", "mlp.q_proj, which does not exist"),
    ("r_zero", "r must be a positive integer"),
    ("not_lora", "peft_type 'IA3'"),
])
def test_invalid_adapters_are_rejected(tmp_path, case, match):
    path = write_peft_adapter(tmp_path / "a", rank=4, target_modules=("q_proj", "v_proj"))
    q0 = "base_model.model.model.layers.0.self_attn.q_proj"
    request_base = None
    if case == "rank":
        path = write_peft_adapter(tmp_path / "b", rank=32)
    elif case == "dora":
        edit_config(path, use_dora=True)
    elif case == "modules_to_save":
        edit_config(path, modules_to_save=["lm_head"])
    elif case == "bias":
        edit_config(path, bias="lora_only")
    elif case == "lora_bias":
        edit_config(path, lora_bias=True)
    elif case == "target_unsupported":
        edit_config(path, target_modules=["q_proj", "lm_head"])
    elif case == "target_missing":
        edit_config(path, target_modules=["c_attn"])
    elif case == "shape":
        edit_tensors(path, lambda t: t.update({f"{q0}.lora_B.weight": torch.ones(32, 4)}))
    elif case == "nan":
        def poison(t):
            t[f"{q0}.lora_A.weight"][1, 3] = float("nan")
        edit_tensors(path, poison)
    elif case == "base_model":
        edit_config(path, base_model_name_or_path="org/other-model")
    elif case == "request_base_model":
        request_base = "yet-another"
    elif case == "layers":
        path = write_peft_adapter(tmp_path / "b", rank=4, num_layers=3)
    elif case == "unexpected_name":
        edit_tensors(path, lambda t: t.update({f"{q0}.magnitude": torch.ones(64)}))
    elif case == "embed_tensor":
        edit_tensors(path, lambda t: t.update({"base_model.model.model.embed_tokens.lora_embedding_A": torch.ones(4, 10)}))
    elif case == "missing_b":
        edit_tensors(path, lambda t: t.pop(f"{q0}.lora_B.weight"))
    elif case == "wrong_parent":
        edit_tensors(path, lambda t: t.update({"base_model.model.model.layers.0.mlp.q_proj.lora_A.weight": torch.ones(4, 64)}))
    elif case == "r_zero":
        edit_config(path, r=0)
    elif case == "not_lora":
        edit_config(path, peft_type="IA3")
    with pytest.raises(AdapterInvalidError, match=match):
        load(path, base_model_name=request_base)


def test_missing_directory_and_files(tmp_path):
    with pytest.raises(AdapterInvalidError, match="does not exist"):
        load(tmp_path / "nowhere")
    path = write_peft_adapter(tmp_path / "a", rank=4)
    (path / "adapter_model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{}")
    with pytest.raises(AdapterInvalidError, match="not a safetensors file|truncated"):
        load(path)


def test_base_model_matches_by_final_component(tmp_path):
    path = write_peft_adapter(tmp_path / "a", rank=4, base_model_name_or_path="meta-llama/tiny-base")
    assert load(path, served="/models/tiny-base").rank == 4


def test_an_adapter_without_base_model_is_loaded_with_one_warning(tmp_path, caplog):
    unnamed = [write_peft_adapter(tmp_path / name, base_model_name_or_path="") for name in ("a", "b")]
    named = write_peft_adapter(tmp_path / "named", base_model_name_or_path="tiny-base")
    with caplog.at_level(logging.WARNING, logger="loraplex.core.lora.adapter"):
        for path in (*unnamed, named, *unnamed):           # read again, as after an eviction
            assert load(path).rank == 8
    warned = [r.getMessage() for r in caplog.records]
    assert len(warned) == 2 and all("base_model_name_or_path is empty" in m and "'tiny-base'" in m for m in warned)
    assert str(unnamed[0]) in warned[0] and str(unnamed[1]) in warned[1]


def test_weights_beyond_the_model_dtype_are_refused(tmp_path):
    # Finite in the file (float32) but not once scaled and cast to a float16 model: refused
    # rather than put into a slot as inf.
    path = write_peft_adapter(tmp_path / "a", rank=4, alpha=8, target_modules=("q_proj", "down_proj"))

    def enlarge(t):
        t["base_model.model.model.layers.1.mlp.down_proj.lora_B.weight"][5, 2] = 40000.0   # x2 scaling > 65504
    edit_tensors(path, enlarge)
    assert load(path, dtype=torch.float32).rank == 4
    with pytest.raises(AdapterInvalidError, match=r"layers\.1\.mlp\.down_proj\.lora_B has values beyond the "
                                                  r"range of the model's torch.float16 once scaled"):
        load(path, dtype=torch.float16)


def write_raw_safetensors(path, entries: dict, data: bytes, header_pad: int = 0) -> None:
    """A safetensors file written by hand: header JSON (padded with spaces) then `data`."""
    header = json.dumps(entries).encode() + b" " * header_pad
    path.write_bytes(len(header).to_bytes(8, "little") + header + data)


def test_unaligned_tensors_in_the_file_load_exactly(tmp_path):
    # The safetensors writer aligns tensor data, but the format does not require it: a file
    # whose data starts at an odd byte still loads, with the same values.
    path = write_peft_adapter(tmp_path / "a", rank=4, target_modules=("q_proj",))
    weights = path / "adapter_model.safetensors"
    tensors = load_file(str(weights))
    expected, expected_bf16 = load(path), load(path, dtype=torch.bfloat16)
    entries, blob = {}, b""
    for name, tensor in tensors.items():
        raw = tensor.contiguous().numpy().tobytes()
        entries[name] = {"dtype": "F32", "shape": list(tensor.shape), "data_offsets": [len(blob), len(blob) + len(raw)]}
        blob += raw
    header_len = len(json.dumps(entries).encode())
    write_raw_safetensors(weights, entries, blob, header_pad=(1 - (8 + header_len)) % 4)  # data at 1 mod 4
    assert (8 + len(json.dumps(entries).encode()) + (1 - (8 + header_len)) % 4) % 4 == 1
    # float32 into float32 is read into place byte for byte; into bfloat16 it goes through a
    # tensor view of the file, which must start aligned.
    for dtype, want in ((torch.float32, expected), (torch.bfloat16, expected_bf16)):
        adapter = load(path, dtype=dtype)
        for layer in range(2):
            for got, ref in zip(adapter.module_weights(layer, "q_proj"), want.module_weights(layer, "q_proj")):
                assert got.dtype == dtype and torch.equal(got, ref)


def test_tensors_out_of_order_and_apart_in_the_file_load_exactly(tmp_path):
    # Tensors read straight into place come in runs of neighbours in the file: a file in
    # another order, with gaps between tensors, reads into the same places.
    path = write_peft_adapter(tmp_path / "a", rank=4, alpha=12, target_modules=("q_proj", "v_proj", "down_proj"))
    weights = path / "adapter_model.safetensors"
    tensors = load_file(str(weights))
    expected = load(path)
    entries, blob = {}, b""
    for i, (name, tensor) in enumerate(sorted(tensors.items(), reverse=True)):
        blob += b"\x7f" * (4 * (i % 3))                    # gaps of 0, 4 or 8 bytes
        raw = tensor.contiguous().numpy().tobytes()
        entries[name] = {"dtype": "F32", "shape": list(tensor.shape), "data_offsets": [len(blob), len(blob) + len(raw)]}
        blob += raw
    write_raw_safetensors(weights, entries, blob)
    adapter = load(path)
    for name, packed in expected.targets.items():
        assert torch.equal(adapter.targets[name].lora_a, packed.lora_a)
        assert torch.equal(adapter.targets[name].lora_b, packed.lora_b)
    assert expected.targets["down_proj"].lora_b.abs().sum() > 0


def test_a_file_cut_short_while_reading_is_refused(tmp_path):
    # Validation checks the size first; a file replaced in place afterwards, shorter, must
    # not leave a half-read adapter (zeros where weights were).
    path = write_peft_adapter(tmp_path / "a", rank=4, target_modules=("q_proj",), num_layers=1)
    weights = path / "adapter_model.safetensors"
    source = SafetensorsFile(weights, validate_adapter_dir(path).header, "'a'")
    pieces = [(t, memoryview(bytearray(t.nbytes))) for t in source.tensors.values()]
    with open(weights, "r+b") as f:
        f.truncate(weights.stat().st_size - 100)
    with pytest.raises(AdapterInvalidError, match="ended early"):
        source.read_into(pieces)


@pytest.mark.parametrize("change, match", [
    (lambda e: e.update(dtype="X7"), "has dtype 'X7'; expected floating-point"),
    (lambda e: e.update(dtype="I32"), "has dtype torch.int32; expected floating-point"),
    (lambda e: e.update(shape=[4, "64"]), "invalid shape"),
    (lambda e: e.update(shape=[4, 63]), "needs 1008; the file is corrupt"),
    (lambda e: e.update(data_offsets=[0.5, 1024.5]), "the file is corrupt"),
])
def test_corrupt_safetensors_headers_are_refused(tmp_path, change, match):
    path = write_peft_adapter(tmp_path / "a", rank=4, target_modules=("q_proj",), num_layers=1)
    weights = path / "adapter_model.safetensors"
    tensors = load_file(str(weights))
    entries, blob = {}, b""
    for name, tensor in sorted(tensors.items()):
        raw = tensor.contiguous().numpy().tobytes()
        entries[name] = {"dtype": "F32", "shape": list(tensor.shape), "data_offsets": [len(blob), len(blob) + len(raw)]}
        blob += raw
    change(entries[next(n for n in entries if n.endswith("q_proj.lora_A.weight"))])   # A is [4, 64] float32
    write_raw_safetensors(weights, entries, blob)
    with pytest.raises(AdapterInvalidError, match=match):
        load(path)


def test_loaded_adapter_does_not_depend_on_its_file(tmp_path):
    # The file is mapped while loading, never after: overwriting or deleting it leaves the
    # loaded weights as they were.
    path = write_peft_adapter(tmp_path / "a", rank=4, target_modules=("q_proj", "down_proj"))
    adapter = load(path)
    before = {k: (p.lora_a.clone(), p.lora_b.clone()) for k, p in adapter.targets.items()}
    edit_tensors(path, lambda t: t.update({k: torch.full_like(v, 7.0) for k, v in t.items()}))
    (path / "adapter_model.safetensors").unlink()
    for name, packed in adapter.targets.items():
        assert torch.equal(packed.lora_a, before[name][0]) and torch.equal(packed.lora_b, before[name][1])
    assert before["qkv_proj"][0].abs().sum() > 0


def test_scaling_is_rounded_once_from_any_file_dtype(tmp_path):
    """B * scaling is computed in float32 and rounded once into the model's dtype, whatever the
    file's dtype (a 16-bit B is exact in float32)."""
    for file_dtype in (torch.float32, torch.bfloat16, torch.float16):
        for model_dtype in (torch.float32, torch.bfloat16, torch.float16):
            path = write_peft_adapter(tmp_path / f"{file_dtype}-{model_dtype}", rank=4, alpha=7,
                                      target_modules=("v_proj",), num_layers=1, dtype=file_dtype)
            raw = load_file(str(path / "adapter_model.safetensors"))
            b = raw["base_model.model.model.layers.0.self_attn.v_proj.lora_B.weight"]
            got = load(path, dtype=model_dtype).module_weights(0, "v_proj")[1]
            assert torch.equal(got, (b.float() * (7 / 4)).to(model_dtype)), (file_dtype, model_dtype)


def test_torch_calls_of_a_load_do_not_grow_with_its_tensors(tmp_path):
    # Each torch call lets the GIL go and may wait up to 5 ms to take it back beside a busy
    # thread (the engine's step loop): an 8B adapter's 448 tensors copied a few calls each took
    # seconds. Tensors in the model's dtype are read into place with the file's bytes instead,
    # so a load makes the same few calls however many tensors it has.
    from torch.overrides import TorchFunctionMode

    class Count(TorchFunctionMode):
        calls = 0

        def __torch_function__(self, func, types, args=(), kwargs=None):
            Count.calls += 1
            return func(*args, **(kwargs or {}))

    spec = llama_lora_spec(num_layers=8, hidden_size=64, num_heads=4, num_kv_heads=2, head_dim=16,
                           intermediate_size=128)
    counts = []
    for num_layers in (2, 8):
        path = write_peft_adapter(tmp_path / f"l{num_layers}", rank=4, target_modules=ALL_TARGETS,
                                  num_layers=num_layers, dtype=torch.bfloat16)
        Count.calls = 0
        with Count():
            load_lora_adapter(LoRARequest("a", 1, str(path)), spec, max_lora_rank=4, dtype=torch.bfloat16,
                              served_model_name="tiny-base")
        counts.append(Count.calls)
    # The same calls, but for two more when the buffer was an earlier adapter's and is zeroed.
    assert max(counts) - min(counts) <= 2 and max(counts) < 40, counts


def test_a_recycled_buffer_holds_only_the_next_adapters_weights(tmp_path, host_buffer_pool):
    """An adapter freed from the cache leaves its page-locked buffer to the next load of the same
    size (host_buffer.py). Where the next adapter writes nothing (a module it does not adapt, a
    layer it lacks) its slots must read zero, not the earlier adapter's weights; where it writes
    everything, the buffer is overwritten exactly."""
    qkv = ("q_proj", "k_proj", "v_proj")
    first = write_peft_adapter(tmp_path / "first", rank=4, alpha=8, target_modules=qkv, seed=1)
    every = write_peft_adapter(tmp_path / "every", rank=4, alpha=8, target_modules=qkv, seed=2)
    some = write_peft_adapter(tmp_path / "some", rank=4, alpha=8, target_modules=("k_proj", "v_proj"), seed=3)
    v1 = "base_model.model.model.layers.1.self_attn.v_proj"
    edit_tensors(some, lambda t: [t.pop(f"{v1}.lora_{x}.weight") for x in "AB"])   # layer 1's v: none

    def address_after_freeing(adapter) -> int:
        address = adapter.targets["qkv_proj"].lora_a.data_ptr()
        del adapter
        gc.collect()
        return address

    address = address_after_freeing(load(first))
    packed = load(every).targets["qkv_proj"]              # every element written: no zeroing needed
    assert packed.lora_a.data_ptr() == address
    raw = load_file(str(every / "adapter_model.safetensors"))
    for layer in range(2):
        for index, module in enumerate(qkv):
            key = f"base_model.model.model.layers.{layer}.self_attn.{module}"
            torch.testing.assert_close(packed.lora_a[layer, 4 * index:4 * index + 4], raw[f"{key}.lora_A.weight"])
    torch.testing.assert_close(packed.lora_b[1, 96:128], raw[f"{v1}.lora_B.weight"] * 2.0)
    del packed
    address = address_after_freeing(load(first))
    adapter = load(some)
    packed = adapter.targets["qkv_proj"]
    assert packed.lora_a.data_ptr() == address and adapter.module_weights(1, "v_proj") is None
    assert packed.lora_a[:, 0:4].abs().sum() == 0 and packed.lora_b[:, 0:64].abs().sum() == 0      # q: not adapted
    assert packed.lora_a[1, 8:12].abs().sum() == 0 and packed.lora_b[1, 96:128].abs().sum() == 0   # layer 1's v
    raw = load_file(str(some / "adapter_model.safetensors"))
    torch.testing.assert_close(packed.lora_a[0, 8:12], raw["base_model.model.model.layers.0.self_attn.v_proj.lora_A.weight"])


def test_an_adapter_in_a_larger_reserved_buffer_packs_as_in_fresh_memory(tmp_path, host_buffer_pool):
    """Engines reserve buffers for the largest adapter they take (every target at max_lora_rank)
    before any arrives; a smaller adapter packed into one that held a full-size adapter must
    read exactly as it does from fresh memory, down to the zeros it does not write."""
    full = write_peft_adapter(tmp_path / "full", rank=16, alpha=16, target_modules=ALL_TARGETS, seed=1)
    small = write_peft_adapter(tmp_path / "small", rank=4, alpha=8, target_modules=("k_proj", "up_proj"), seed=2)
    reference = load(small)                          # kept: its fresh block stays out of the pool
    nbytes = largest_packed_nbytes(SPEC, 16, torch.float32)
    assert HostBuffer.reserve(nbytes, up_to=1, register=False)
    filled = load(full)
    assert filled.host_buffer.reserved and filled.num_bytes == nbytes   # the full adapter fills the block
    del filled
    gc.collect()
    adapter = load(small)
    assert adapter.host_buffer.reserved and adapter.num_bytes < nbytes
    assert not reference.host_buffer.reserved and set(adapter.targets) == set(reference.targets)
    for name, packed in reference.targets.items():
        assert torch.equal(adapter.targets[name].lora_a, packed.lora_a)
        assert torch.equal(adapter.targets[name].lora_b, packed.lora_b)
