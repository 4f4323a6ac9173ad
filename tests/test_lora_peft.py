"""Multi-LoRA batches against transformers + PEFT, row by row.

One batch holds base-model rows and rows for four adapters of ranks 4, 8, 16 and 32 (with
different target modules, two of them rsLoRA). Each row must give the greedy tokens PEFT
gives with that adapter alone, and last-prompt-token logits within 1e-4 relative error
(fp32). The same must hold with fewer slots than adapters in flight (LRU eviction and
reload from disk) and with pinned adapters.
"""

from __future__ import annotations

import gc
import weakref

import pytest
import torch

from lora_reference import ADAPTER_SPECS, AdapterSpec, peft_model, reference_greedy, write_peft_lora
from runner_helpers import BlockAllocator, new_sequences, prefill, random_prompts, relative_error
from loraplex import LLM, LoRARequest, SamplingParams

NUM_TOKENS = 5
PROMPT_LENGTHS = (7, 5, 9, 6, 11, 4, 8)
ROW_ADAPTERS = (None, 0, 1, 2, 3, None, 0)     # index into ADAPTER_SPECS per row; None = base


@pytest.fixture(scope="module", params=["llama", "qwen2", "mistral"])
def setup(request, tiny_checkpoint, tmp_path_factory):
    arch = request.param
    model_dir = tiny_checkpoint(arch)
    adapter_root = tmp_path_factory.mktemp(f"peft-{arch}")
    loras = [LoRARequest(spec.name, i + 1, str(write_peft_lora(model_dir, adapter_root / spec.name, spec, seed=i)))
             for i, spec in enumerate(ADAPTER_SPECS)]
    prompts = random_prompts(list(PROMPT_LENGTHS), vocab_size=300, seed=7)
    refs = {}
    for adapter in {a for a in ROW_ADAPTERS}:
        model = peft_model(model_dir, None if adapter is None else loras[adapter].lora_path)
        for row, row_adapter in enumerate(ROW_ADAPTERS):
            if row_adapter == adapter:
                refs[row] = reference_greedy(model, prompts[row], NUM_TOKENS)
    # The adapters must change the outputs, or the comparison proves nothing.
    with torch.no_grad():
        base_logits = peft_model(model_dir, None)(torch.tensor([prompts[1]])).logits[0, -1]
    assert relative_error(refs[1][1], base_logits) > 1e-2
    return dict(model_dir=model_dir, loras=loras, prompts=prompts, refs=refs)


def make_llm(model_dir, **kwargs) -> LLM:
    settings = dict(enable_lora=True, max_loras=8, max_lora_rank=32, max_cpu_loras=8, dtype="float32",
                    device="cpu", block_size=4, max_model_len=64, kv_cache_bytes=1 << 20)
    settings.update(kwargs)
    return LLM(model=str(model_dir), **settings)


def row_requests(setup) -> list[LoRARequest | None]:
    return [None if a is None else setup["loras"][a] for a in ROW_ADAPTERS]


def check_greedy(llm: LLM, setup) -> None:
    params = SamplingParams(temperature=0.0, max_tokens=NUM_TOKENS, ignore_eos=True)
    outputs = llm.generate([{"prompt_token_ids": p} for p in setup["prompts"]], params,
                           lora_request=row_requests(setup), use_tqdm=False)
    for row, output in enumerate(outputs):
        assert list(output.outputs[0].token_ids) == setup["refs"][row][0], f"row {row} ({ROW_ADAPTERS[row]})"


def check_logits(llm: LLM, setup, rows) -> list:
    """Logits of one mixed prefill step of `rows`, straight from the runner, against PEFT's."""
    runner = llm.llm_engine.runner
    seqs = new_sequences([setup["prompts"][row] for row in rows])
    for seq, row in zip(seqs, rows):
        seq.lora_request = row_requests(setup)[row]
    logits = prefill(runner, BlockAllocator(runner.num_kv_blocks, runner.block_size), seqs)
    for seq_logits, row in zip(logits, rows):
        assert relative_error(seq_logits, setup["refs"][row][1]) < 1e-4, f"row {row}"
    return seqs


def test_mixed_batch_matches_peft(setup):
    llm = make_llm(setup["model_dir"])
    check_greedy(llm, setup)
    seqs = check_logits(llm, setup, range(len(ROW_ADAPTERS)))
    assert {s.lora_slot for s, a in zip(seqs, ROW_ADAPTERS) if a is None} == {-1}
    assert len({s.lora_slot for s, a in zip(seqs, ROW_ADAPTERS) if a is not None}) == 4


def test_fewer_slots_than_adapters_evicts_and_reloads(setup):
    # 4 adapters in flight, 2 slots, 2 CPU entries: the scheduler caps each step at 2 adapters,
    # slots are reused, and evicted adapters are reloaded from disk.
    llm = make_llm(setup["model_dir"], max_loras=2, max_cpu_loras=2)
    check_greedy(llm, setup)
    check_greedy(llm, setup)
    stats = llm.llm_engine.lora_manager.stats
    assert stats["device_evictions"] >= 2 and stats["cpu_misses"] >= 2   # slots reused, reloads from disk
    assert len(llm.llm_engine.lora_manager.list_loras()) <= 2 + 2        # CPU entries + slot-only adapters
    # Logits too, through evictions and reloads: adapters 0+1, then 2+3 (evicting 0 and 1), then 0+1.
    misses = stats["cpu_misses"]
    for rows in ((0, 1, 2, 5), (3, 4), (1, 6, 2)):
        check_logits(llm, setup, rows)
    assert stats["cpu_misses"] >= misses + 2


def test_pinned_adapter_stays_and_others_rotate(setup):
    llm = make_llm(setup["model_dir"], max_loras=2, max_cpu_loras=3)
    pinned = setup["loras"][3]
    llm.add_lora(pinned)
    assert llm.pin_lora(pinned.lora_int_id)
    manager = llm.llm_engine.lora_manager
    slot = manager.slot_of(pinned.lora_int_id)
    check_greedy(llm, setup)
    assert manager.slot_of(pinned.lora_int_id) == slot and pinned.lora_int_id in llm.list_loras()
    for rows in ((0, 1, 4), (2, 4, 5), (3, 4)):     # the pinned adapter (row 4) beside each other one
        check_logits(llm, setup, rows)
    assert manager.slot_of(pinned.lora_int_id) == slot


def test_remove_lora_frees_slot_and_cpu_copy(setup):
    llm = make_llm(setup["model_dir"], max_loras=1, max_cpu_loras=1)
    first, second = setup["loras"][0], setup["loras"][2]
    params = SamplingParams(temperature=0.0, max_tokens=NUM_TOKENS, ignore_eos=True)
    llm.generate({"prompt_token_ids": setup["prompts"][1]}, params, lora_request=first, use_tqdm=False)
    manager = llm.llm_engine.lora_manager
    cpu_copy = weakref.ref(manager._cpu[first.lora_int_id].targets["qkv_proj"].lora_a)
    llm.pin_lora(first.lora_int_id)
    assert llm.remove_lora(first.lora_int_id)
    gc.collect()
    assert cpu_copy() is None and llm.list_loras() == set()
    assert manager.stacks.stack(0, "qkv_proj").lora_a.abs().sum() == 0
    # The single slot and CPU entry serve another adapter, and outputs still match PEFT.
    prompts = [setup["prompts"][3], setup["prompts"][1]]
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, lora_request=[second, first],
                        use_tqdm=False)
    assert list(outs[0].outputs[0].token_ids) == setup["refs"][3][0]
    assert list(outs[1].outputs[0].token_ids) == setup["refs"][1][0]


def test_rank_and_alpha_patterns_match_peft(setup, tmp_path):
    spec = AdapterSpec("patterns", 4, 8, ("q_proj", "v_proj", "down_proj"),
                       rank_pattern=(("layers.1.self_attn.q_proj", 16), ("down_proj", 8)),
                       alpha_pattern=(("v_proj", 32),))
    path = write_peft_lora(setup["model_dir"], tmp_path / "patterns", spec, seed=11)
    lora = LoRARequest("patterns", 9, str(path))
    prompt = setup["prompts"][4]
    expected, expected_logits = reference_greedy(peft_model(setup["model_dir"], path), prompt, NUM_TOKENS)
    llm = make_llm(setup["model_dir"], max_lora_rank=16)
    out = llm.generate([{"prompt_token_ids": prompt}] * 2, SamplingParams(temperature=0.0, max_tokens=NUM_TOKENS,
                       ignore_eos=True), lora_request=[lora, None], use_tqdm=False)
    assert list(out[0].outputs[0].token_ids) == expected
    runner = llm.llm_engine.runner
    seq = new_sequences([prompt], loras=[lora])[0]
    logits = prefill(runner, BlockAllocator(runner.num_kv_blocks, runner.block_size), [seq])
    assert relative_error(logits[0], expected_logits) < 1e-4
