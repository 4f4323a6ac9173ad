"""LoRA through the engines: unusable adapters are refused with clear errors while the engine
keeps serving, and the async engine loads adapters by name through the resolver chain."""

from __future__ import annotations

import asyncio
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from adapters import write_peft_adapter
from lora_reference import peft_model, reference_greedy
from plugin_helpers import isolated_plugins  # noqa: F401  (fixture)
from runner_helpers import random_prompts
from loraplex import LLM, LoRARequest, SamplingParams
from loraplex.core.async_engine import AsyncEngine
from loraplex.core.config import EngineConfig
from loraplex.core.llm_engine import LLMEngine
from loraplex.errors import AdapterCapacityError, AdapterInvalidError, AdapterNotFoundError

NUM_TOKENS = 4
SETTINGS = dict(enable_lora=True, max_loras=2, max_lora_rank=16, max_cpu_loras=2, dtype="float32", device="cpu",
                block_size=4, max_model_len=64, kv_cache_bytes=1 << 20)
PARAMS = SamplingParams(temperature=0.0, max_tokens=NUM_TOKENS, ignore_eos=True)


@pytest.fixture(scope="module")
def model_dir(tiny_checkpoint):
    return tiny_checkpoint("llama")


@pytest.fixture(scope="module")
def prompt():
    return random_prompts([6], vocab_size=300, seed=3)[0]


def good_adapter(path, model_dir, seed=0):
    return write_peft_adapter(path, rank=8, alpha=16, target_modules=("q_proj", "v_proj", "down_proj"),
                              base_model_name_or_path=str(model_dir), seed=seed)


def broken_adapters(root, model_dir) -> dict[str, tuple[object, str]]:
    """name -> (adapter dir, expected error fragment), one per validation rule."""
    base = str(model_dir)

    def with_tensor_change(name, change):
        path = good_adapter(root / name, model_dir)
        tensors = load_file(str(path / "adapter_model.safetensors"))
        change(tensors)
        save_file(tensors, str(path / "adapter_model.safetensors"))
        return path

    def with_config_change(name, **changes):
        path = good_adapter(root / name, model_dir)
        config = json.loads((path / "adapter_config.json").read_text())
        config.update(changes)
        (path / "adapter_config.json").write_text(json.dumps(config))
        return path

    def poison(t):
        t["base_model.model.model.layers.1.mlp.down_proj.lora_B.weight"][0, 0] = float("inf")

    q0 = "base_model.model.model.layers.0.self_attn.q_proj"
    pickle_only = good_adapter(root / "pickle", model_dir)
    torch.save(load_file(str(pickle_only / "adapter_model.safetensors")), pickle_only / "adapter_model.bin")
    (pickle_only / "adapter_model.safetensors").unlink()
    return {
        "rank": (write_peft_adapter(root / "rank", rank=32, base_model_name_or_path=base), "max_lora_rank=16"),
        "dora": (write_peft_adapter(root / "dora", rank=4, base_model_name_or_path=base, use_dora=True), "DoRA"),
        "modules_to_save": (write_peft_adapter(root / "mts", rank=4, base_model_name_or_path=base,
                                               modules_to_save=["lm_head"]), "modules_to_save"),
        "bias": (write_peft_adapter(root / "bias", rank=4, base_model_name_or_path=base, bias="all"), "bias"),
        "target": (with_config_change("target", target_modules=["q_proj", "embed_tokens"]), "does not adapt"),
        "shape": (with_tensor_change("shape", lambda t: t.update({f"{q0}.lora_A.weight": torch.ones(8, 32)})),
                  r"expected \[8, 64\]"),
        "nonfinite": (with_tensor_change("nonfinite", poison), "NaN or infinite"),
        "base_model": (write_peft_adapter(root / "base", rank=4, base_model_name_or_path="org/another-model"),
                       "trained for base model"),
        "layers": (write_peft_adapter(root / "layers", rank=4, num_layers=4, base_model_name_or_path=base),
                   "the model has 2 layers"),
        "names": (with_tensor_change("names", lambda t: t.update({"lm_head.weight": torch.ones(3, 3)})),
                  "adapts 'lm_head'"),
        "pickle": (pickle_only, "pickle"),
    }


def test_invalid_adapters_are_refused_and_the_engine_keeps_serving(model_dir, prompt, tmp_path):
    llm = LLM(model=str(model_dir), **SETTINGS)
    good = LoRARequest("good", 1, str(good_adapter(tmp_path / "good", model_dir)))
    expected_base = reference_greedy(peft_model(model_dir, None), prompt, NUM_TOKENS)[0]
    expected_good = reference_greedy(peft_model(model_dir, good.lora_path), prompt, NUM_TOKENS)[0]
    assert expected_good != expected_base
    for index, (name, (path, message)) in enumerate(broken_adapters(tmp_path, model_dir).items()):
        bad = LoRARequest(name, 100 + index, str(path))
        with pytest.raises(AdapterInvalidError, match=message):
            llm.generate([{"prompt_token_ids": prompt}] * 2, PARAMS, lora_request=[good, bad], use_tqdm=False)
        assert bad.lora_int_id not in llm.list_loras()
        outs = llm.generate([{"prompt_token_ids": prompt}] * 2, PARAMS, lora_request=[good, None], use_tqdm=False)
        assert [list(o.outputs[0].token_ids) for o in outs] == [expected_good, expected_base], name
        assert not llm.llm_engine.has_unfinished_requests()


def test_pickle_weights_load_when_allowed(model_dir, prompt, tmp_path):
    path = good_adapter(tmp_path / "pickled", model_dir)
    torch.save(load_file(str(path / "adapter_model.safetensors")), path / "adapter_model.bin")
    (path / "adapter_model.safetensors").unlink()
    llm = LLM(model=str(model_dir), allow_pickle_lora_weights=True, **SETTINGS)
    out = llm.generate({"prompt_token_ids": prompt}, PARAMS, lora_request=LoRARequest("p", 1, str(path)),
                       use_tqdm=False)
    # The same weights from safetensors, through PEFT:
    good = good_adapter(tmp_path / "same", model_dir)
    assert list(out[0].outputs[0].token_ids) == reference_greedy(peft_model(model_dir, good), prompt, NUM_TOKENS)[0]


async def _collect(engine: AsyncEngine, prompt, **kwargs) -> list[int]:
    final = None
    async for output in engine.generate({"prompt_token_ids": prompt}, PARAMS, **kwargs):
        final = output
    return list(final.outputs[0].token_ids)


@pytest.mark.parametrize("engine_process", [False, True], ids=["thread", "engine-process"])
def test_async_engine_resolves_names_through_the_filesystem_resolver(
        model_dir, prompt, tmp_path, monkeypatch, isolated_plugins, engine_process):  # noqa: F811
    cache_dir = tmp_path / "lora-cache"
    good_adapter(cache_dir / "sql", model_dir, seed=1)
    good_adapter(cache_dir / "team" / "chat", model_dir, seed=2)
    write_peft_adapter(cache_dir / "dora", rank=4, base_model_name_or_path=str(model_dir), use_dora=True)
    monkeypatch.setenv("VLLM_LORA_RESOLVER_CACHE_DIR", str(cache_dir))
    monkeypatch.setenv("VLLM_PLUGINS", "lora_filesystem_resolver")
    expected = {name: reference_greedy(peft_model(model_dir, cache_dir / name), prompt, NUM_TOKENS)[0]
                for name in ("sql", "team/chat")}
    expected_base = reference_greedy(peft_model(model_dir, None), prompt, NUM_TOKENS)[0]

    async def main():
        config = EngineConfig(model=str(model_dir), **SETTINGS)
        # The names resolve in this process either way; the loads run in the engine loop's.
        engine = AsyncEngine.from_config(config, engine_process=True) if engine_process \
            else AsyncEngine(LLMEngine(config))
        outcomes = []
        try:
            engine._lora_resolution.chain.add_listener(lambda name, outcome, s: outcomes.append((name, outcome)))
            # Five concurrent requests for an unknown name: one resolve, one load.
            results = await asyncio.gather(*[_collect(engine, prompt, lora_name="sql") for _ in range(5)],
                                           _collect(engine, prompt, lora_name="team/chat"),
                                           _collect(engine, prompt))
            assert results[:5] == [expected["sql"]] * 5
            assert results[5] == expected["team/chat"] and results[6] == expected_base
            assert outcomes.count(("lora_filesystem_resolver", "found")) == 2
            with pytest.raises(AdapterNotFoundError, match="no LoRA adapter named 'missing'"):
                await _collect(engine, prompt, lora_name="missing")
            with pytest.raises(AdapterInvalidError, match="DoRA"):
                await _collect(engine, prompt, lora_name="dora")
            found_so_far = outcomes.count(("lora_filesystem_resolver", "found"))   # "dora" was found
            # Still serving, and a loaded name is not resolved again.
            assert await _collect(engine, prompt, lora_name="sql") == expected["sql"]
            assert outcomes.count(("lora_filesystem_resolver", "found")) == found_so_far
            sql = await engine.get_lora_request("sql")
            assert await engine.remove_lora(sql.lora_int_id)
            assert sql.lora_int_id not in await engine.list_loras()
            assert await _collect(engine, prompt, lora_name="sql") == expected["sql"]   # resolved again
            assert outcomes.count(("lora_filesystem_resolver", "found")) == found_so_far + 1
        finally:
            engine.shutdown()

    asyncio.run(main())



def test_all_slots_pinned_is_an_explicit_error_not_a_hang(model_dir, prompt, tmp_path):
    llm = LLM(model=str(model_dir), **dict(SETTINGS, max_loras=1))
    pinned = LoRARequest("pinned", 1, str(good_adapter(tmp_path / "pinned", model_dir, seed=1)))
    other = LoRARequest("other", 2, str(good_adapter(tmp_path / "other", model_dir, seed=2)))
    llm.add_lora(pinned)
    llm.pin_lora(pinned.lora_int_id)
    with pytest.raises(AdapterCapacityError, match="remove a pinned adapter"):
        llm.generate({"prompt_token_ids": prompt}, PARAMS, lora_request=other, use_tqdm=False)
    assert not llm.llm_engine.has_unfinished_requests()
    outs = llm.generate([{"prompt_token_ids": prompt}] * 2, PARAMS, lora_request=[pinned, None], use_tqdm=False)
    assert list(outs[1].outputs[0].token_ids) == reference_greedy(peft_model(model_dir, None), prompt, NUM_TOKENS)[0]
    llm.remove_lora(pinned.lora_int_id)
    out = llm.generate({"prompt_token_ids": prompt}, PARAMS, lora_request=other, use_tqdm=False)
    assert list(out[0].outputs[0].token_ids) == reference_greedy(peft_model(model_dir, other.lora_path), prompt,
                                                                  NUM_TOKENS)[0]


def test_adapter_that_fails_to_reload_fails_only_its_requests(model_dir, prompt, tmp_path):
    engine = LLMEngine(EngineConfig(model=str(model_dir), **dict(SETTINGS, max_loras=1, max_cpu_loras=1)))
    fragile = LoRARequest("fragile", 1, str(good_adapter(tmp_path / "fragile", model_dir, seed=1)))
    other = LoRARequest("other", 2, str(good_adapter(tmp_path / "other", model_dir, seed=2)))
    engine.add_lora(fragile)
    engine.add_lora(other)                       # evicts "fragile" from the one CPU entry
    (tmp_path / "fragile" / "adapter_model.safetensors").unlink()   # now it cannot be reloaded
    engine.add_request("broken", {"prompt_token_ids": prompt}, PARAMS, fragile)
    engine.add_request("base", {"prompt_token_ids": prompt}, PARAMS)
    engine.add_request("other", {"prompt_token_ids": prompt}, PARAMS, other)
    finals, failed = {}, []
    while engine.has_unfinished_requests():
        finals.update({o.request_id: o for o in engine.step() if o.finished})
        failed += engine.pop_failed_requests()
    assert [(request_id, type(error)) for request_id, error in failed] == [("broken", AdapterInvalidError)]
    assert "no weights file" in str(failed[0][1])
    assert list(finals["base"].outputs[0].token_ids) == reference_greedy(peft_model(model_dir, None), prompt,
                                                                         NUM_TOKENS)[0]
    assert list(finals["other"].outputs[0].token_ids) == reference_greedy(
        peft_model(model_dir, other.lora_path), prompt, NUM_TOKENS)[0]
    stats = engine.get_stats()
    assert stats.num_free_kv_blocks == stats.num_kv_blocks


def test_async_engine_survives_an_evicted_adapter_whose_directory_vanished(model_dir, prompt, tmp_path):
    long_params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    fragile = LoRARequest("fragile", 1, str(good_adapter(tmp_path / "fragile", model_dir, seed=1)))
    other = LoRARequest("other", 2, str(good_adapter(tmp_path / "other", model_dir, seed=2)))
    third = LoRARequest("third", 3, str(good_adapter(tmp_path / "third", model_dir, seed=3)))
    expected_other = reference_greedy(peft_model(model_dir, other.lora_path), prompt, 40)[0]
    expected_base = reference_greedy(peft_model(model_dir, None), prompt, NUM_TOKENS)[0]

    async def main():
        engine = AsyncEngine(LLMEngine(EngineConfig(model=str(model_dir),
                                                    **dict(SETTINGS, max_loras=1, max_cpu_loras=1))))
        manager = engine.engine.lora_manager
        try:
            # "other" holds the one slot, so "fragile" waits for it in the scheduler, loaded on
            # the CPU. Holding the step lock parks the engine at its next step meanwhile (no race
            # with "other").
            other_stream = engine.generate({"prompt_token_ids": prompt}, long_params, lora_request=other)
            first = await other_stream.__anext__()
            await asyncio.to_thread(manager.add_lora, fragile)
            fragile_task = asyncio.create_task(_collect(engine, prompt, lora_request=fragile))
            deadline = asyncio.get_running_loop().time() + 10
            while engine.engine.get_num_unfinished_requests() < 2:    # in the core, waiting for the slot
                assert asyncio.get_running_loop().time() < deadline
                await asyncio.sleep(0.001)
            manager.step_lock.acquire()
            try:
                shutil.rmtree(tmp_path / "fragile")
                await asyncio.to_thread(manager.add_lora, third)   # evicts fragile's CPU copy
                assert not manager.is_loaded(fragile) and manager.slot_of(other.lora_int_id) is not None
            finally:
                manager.step_lock.release()
            async for final in other_stream:
                pass
            assert first.outputs[0].token_ids and list(final.outputs[0].token_ids) == expected_other
            with pytest.raises(AdapterInvalidError, match="'fragile' .id 1. was evicted .* does not exist"):
                await fragile_task
            assert engine.is_running
            assert await _collect(engine, prompt) == expected_base
            assert await _collect(engine, prompt, lora_request=other) == expected_other[:NUM_TOKENS]
            # A new request for the vanished adapter is refused at submission, clearly.
            with pytest.raises(AdapterInvalidError, match="fragile' does not exist"):
                await _collect(engine, prompt, lora_request=fragile)
            assert engine.is_running
        finally:
            engine.shutdown()

    asyncio.run(main())
