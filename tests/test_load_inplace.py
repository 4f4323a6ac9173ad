"""LoRARequest(load_inplace=True) through the offline API, as in vLLM: the adapter's files
are read again and replace the loaded weights under the same id, once they validate."""

from __future__ import annotations

import pytest

from adapters import write_peft_adapter
from loraplex import LLM, LoRARequest, SamplingParams
from loraplex.errors import AdapterInvalidError

PARAMS = SamplingParams(temperature=0, max_tokens=6)
PROMPT = "update the weights"


def run(llm, request):
    [out] = llm.generate([PROMPT], PARAMS, lora_request=request, use_tqdm=False)
    return out.outputs[0].token_ids


@pytest.fixture(scope="module")
def setup(tiny_checkpoint, tmp_path_factory):
    ckpt = str(tiny_checkpoint())
    root = tmp_path_factory.mktemp("inplace")
    kwargs = dict(base_model_name_or_path=ckpt, alpha=64, target_modules=("q_proj", "v_proj", "down_proj"))
    v1, v2 = write_peft_adapter(root / "v1", seed=1, **kwargs), write_peft_adapter(root / "v2", seed=2, **kwargs)
    reference = {v: run(LLM(ckpt, enable_lora=True, dtype="float32"), LoRARequest("ref", 1, str(v)))
                 for v in (v1, v2)}
    assert reference[v1] != reference[v2]
    return ckpt, v1, v2, reference


def test_load_inplace_swaps_the_weights(setup):
    ckpt, v1, v2, reference = setup
    llm = LLM(ckpt, enable_lora=True, dtype="float32")
    assert run(llm, LoRARequest("live", 1, str(v1))) == reference[v1]
    # Without load_inplace, another path under a loaded id is refused (vLLM silently keeps
    # serving the old weights; docs/vllm.md says why loraplex does not).
    with pytest.raises(AdapterInvalidError, match="load a new version under a new lora_int_id"):
        run(llm, LoRARequest("live", 1, str(v2)))
    assert run(llm, LoRARequest("live", 1, str(v2), load_inplace=True)) == reference[v2]
    assert run(llm, LoRARequest("live", 1, str(v2))) == reference[v2]
    assert llm.add_lora(LoRARequest("live", 1, str(v1), load_inplace=True)) is True
    assert run(llm, LoRARequest("live", 1, str(v1))) == reference[v1]


def test_failed_in_place_load_keeps_the_old_weights(setup, tmp_path):
    ckpt, v1, v2, reference = setup
    llm = LLM(ckpt, enable_lora=True, dtype="float32")
    assert run(llm, LoRARequest("live", 1, str(v1))) == reference[v1]
    broken = write_peft_adapter(tmp_path / "broken", base_model_name_or_path=ckpt)
    (broken / "adapter_model.safetensors").write_bytes(b"junk")
    with pytest.raises(AdapterInvalidError, match="adapter_model.safetensors is truncated"):
        llm.add_lora(LoRARequest("live", 1, str(broken), load_inplace=True))
    assert run(llm, LoRARequest("live", 1, str(v1))) == reference[v1]


def test_load_inplace_through_the_async_engine(setup):
    """AsyncEngine.generate with a load_inplace request: the engine loop reloads the files once,
    then runs the request on the new weights (a load_inplace request never counts as loaded,
    so it must not be sent back to the loader)."""
    import asyncio

    from loraplex.core.async_engine import AsyncEngine
    from loraplex.core.config import EngineConfig
    from loraplex.core.llm_engine import LLMEngine

    ckpt, v1, v2, reference = setup

    async def main():
        engine = AsyncEngine(LLMEngine(EngineConfig(model=ckpt, enable_lora=True, dtype="float32", device="cpu")))

        async def tokens(request):
            async for out in engine.generate(PROMPT, PARAMS, lora_request=request):
                final = out
            return final.outputs[0].token_ids

        try:
            assert await tokens(LoRARequest("live", 1, str(v1))) == reference[v1]
            loads = engine.engine.lora_manager.stats["loads"]
            got = await asyncio.wait_for(tokens(LoRARequest("live", 1, str(v2), load_inplace=True)), 60)
            assert got == reference[v2]
            assert await tokens(LoRARequest("live", 1, str(v2))) == reference[v2]
            assert engine.engine.lora_manager.stats["loads"] - loads == 1
        finally:
            engine.shutdown()

    asyncio.run(main())
