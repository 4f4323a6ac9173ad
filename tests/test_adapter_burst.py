"""Many new adapters at once: their loads run in parallel on the engine loop's loader threads,
and each adapter's first requests start as soon as that adapter is loaded, not when the whole
burst is.

The loads are made to wait for each other (a barrier: it is passed only if they run at the
same time) and for the test (the last adapter's load is held until the first adapter's
request has streamed tokens), so what is checked does not depend on timing. The outputs are
checked against the offline LLM with the same adapters.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from types import SimpleNamespace

import pytest

from adapters import write_peft_adapter
from runner_helpers import random_prompts
from loraplex import LLM, LoRARequest, SamplingParams
from loraplex.core import engine_loop
from loraplex.core.async_engine import AsyncEngine
from loraplex.core.config import EngineConfig
from loraplex.core.llm_engine import LLMEngine
from loraplex.core.lora import manager as manager_module
from loraplex.lora_request import lora_id_for_name

NUM_FAST = 3            # adapters whose loads must overlap; a fourth one is held back
NUM_TOKENS = 6
SETTINGS = dict(enable_lora=True, max_loras=4, max_cpu_loras=4, max_lora_rank=8, dtype="float32", device="cpu",
                block_size=4, max_model_len=64, kv_cache_bytes=1 << 20)
PARAMS = SamplingParams(temperature=0.0, max_tokens=NUM_TOKENS, ignore_eos=True)


def test_loader_pool_overlaps_loads_but_leaves_the_step_loop_the_gil():
    assert NUM_FAST < engine_loop.ADAPTER_LOADER_THREADS <= 4


@pytest.mark.parametrize("cores", [1, 2, 5, 16, 64])
def test_loaders_torch_threads_leave_the_step_loop_a_core(cores):
    """On a GPU engine the loaders' torch ops share the cores; all of them together with the
    step loop's thread fit (16 cores: 3 each; one core: still one thread)."""
    threads = engine_loop.loader_torch_threads(cores)
    assert threads >= 1
    assert threads * engine_loop.ADAPTER_LOADER_THREADS + 1 <= max(cores, engine_loop.ADAPTER_LOADER_THREADS + 1)
    assert engine_loop.loader_torch_threads(16) == 3


def test_loader_thread_count_from_the_environment(monkeypatch):
    assert engine_loop.adapter_loader_threads() == engine_loop.ADAPTER_LOADER_THREADS
    monkeypatch.setenv(engine_loop.LOADER_THREADS_ENV, "7")
    assert engine_loop.adapter_loader_threads() == 7
    assert engine_loop.loader_torch_threads(16) == 2                   # 16 // (7 + 1)
    loop = engine_loop.EngineLoop(core=None, send=lambda message: None)
    assert loop._loader_pool()._max_workers == 7
    loop._loader_pool().shutdown()
    for bad in ("0", "-2", "four", "2.5"):
        monkeypatch.setenv(engine_loop.LOADER_THREADS_ENV, bad)
        with pytest.raises(ValueError, match=f"LORAPLEX_ADAPTER_LOADER_THREADS='{bad}': give a whole number"):
            engine_loop.adapter_loader_threads()


@pytest.mark.parametrize("how", ["generate", "add_lora"])
def test_a_burst_of_new_adapters_loads_in_parallel_and_each_starts_when_ready(tiny_checkpoint, tmp_path,
                                                                              monkeypatch, how, host_buffer_pool):
    """how="generate": first requests name adapters the engine has never loaded (the engine
    loop loads them); "add_lora": each is loaded by add_lora, then requested (what the server's
    resolution on first request does). Each packs into a host buffer the loop reserved when it
    started (LoRAManager.host_buffer_reservations)."""
    model_dir = tiny_checkpoint("llama")
    names = [f"burst-{i}" for i in range(NUM_FAST)] + ["held-back"]
    loras = [LoRARequest(name, lora_id_for_name(name),
                         str(write_peft_adapter(tmp_path / name, rank=8, seed=i, base_model_name_or_path=str(model_dir))))
             for i, name in enumerate(names)]
    prompt = random_prompts([5], vocab_size=300, seed=1)[0]
    offline = LLM(str(model_dir), **SETTINGS)
    expected = {lora.lora_name: list(offline.generate({"prompt_token_ids": prompt}, PARAMS, lora_request=lora,
                                                      use_tqdm=False)[0].outputs[0].token_ids) for lora in loras}

    # The loads: the fast ones wait at a barrier for each other; the held-back one until released.
    overlap = threading.Barrier(NUM_FAST, timeout=20)
    release = threading.Event()
    spans: dict[str, list[float]] = {}
    in_reserved: dict[str, bool] = {}
    real_load = manager_module.load_lora_adapter

    def load(request, *args, **kwargs):
        spans[request.lora_name] = [time.monotonic()]
        if request.lora_name == "held-back":
            assert release.wait(20), "the test never released the held-back adapter"
        else:
            overlap.wait()       # raises BrokenBarrierError unless NUM_FAST loads run at once
        adapter = real_load(request, *args, **kwargs)
        spans[request.lora_name].append(time.monotonic())
        in_reserved[request.lora_name] = adapter.host_buffer.reserved
        return adapter

    monkeypatch.setattr(manager_module, "load_lora_adapter", load)
    events: list[tuple[str, str]] = []      # (adapter, "first token" | "done"), in the order they happened

    async def one(engine: AsyncEngine, lora: LoRARequest) -> list[int]:
        if how == "add_lora":
            assert await engine.add_lora(lora)
        tokens = []
        async for out in engine.generate({"prompt_token_ids": prompt}, PARAMS, f"r-{lora.lora_name}",
                                          lora_request=lora):
            if not tokens and out.outputs[0].token_ids:
                events.append((lora.lora_name, "first token"))
                if lora.lora_name == names[0]:
                    # The first adapter streams while the held-back one is still loading.
                    assert "held-back" not in spans or len(spans["held-back"]) == 1
                    release.set()
            tokens = list(out.outputs[0].token_ids)
        events.append((lora.lora_name, "done"))
        return tokens

    async def main() -> list[list[int]]:
        engine = AsyncEngine(LLMEngine(EngineConfig(model=str(model_dir), **SETTINGS)))
        try:
            return await asyncio.gather(*(one(engine, lora) for lora in loras))
        finally:
            engine.shutdown()

    results = asyncio.run(main())
    assert dict(zip(names, results)) == expected
    # The fast loads overlapped in time (they met at the barrier), and the held-back one was
    # still loading when the first adapter's request had its first token.
    starts, ends = [spans[n][0] for n in names[:NUM_FAST]], [spans[n][1] for n in names[:NUM_FAST]]
    assert max(starts) < min(ends)
    assert events.index((names[0], "first token")) < events.index(("held-back", "first token"))
    assert spans["held-back"][1] > spans[names[0]][1]
    assert in_reserved == dict.fromkeys(names, True)


@pytest.mark.parametrize("device, expected", [("cuda", True), ("cuda:1", True), ("cpu", False)])
def test_an_engine_process_on_a_gpu_starts_with_a_share_of_the_cores(monkeypatch, device, expected):
    """The engine process of `loraplex serve` gets OMP_NUM_THREADS (a share of the cores) when
    its model runs on a GPU and the user set none; the API process's own environment is left
    as it was. CPU engines keep every core for the model."""
    from loraplex.core import engine_process
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    threads = engine_process.engine_torch_threads(SimpleNamespace(device=device))
    cores = len(os.sched_getaffinity(0))
    assert threads == (engine_loop.loader_torch_threads(cores) if expected else None)
    with engine_process._engine_environment(threads):
        assert os.environ.get("OMP_NUM_THREADS") == (str(threads) if expected else None)
    assert "OMP_NUM_THREADS" not in os.environ
    monkeypatch.setenv("OMP_NUM_THREADS", "5")           # the user's choice stands
    assert engine_process.engine_torch_threads(SimpleNamespace(device=device)) is None


def test_no_gpu_here_means_no_thread_setting_when_no_device_is_named(monkeypatch):
    from loraplex.core import engine_process
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    has_gpu_file = any(n.startswith("nvidia") and n[6:].isdigit() for n in os.listdir("/dev"))
    assert engine_process._gpu_serves(SimpleNamespace(device=None)) == has_gpu_file
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert not engine_process._gpu_serves(SimpleNamespace(device=None))
