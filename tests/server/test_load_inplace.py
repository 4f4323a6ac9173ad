"""load_inplace for real: under streaming traffic the last version loaded is what new requests
get, every time; a request already running finishes on the version it started with; a failed
in-place load leaves the old version serving."""

from __future__ import annotations

import asyncio
import shutil
import threading
import time

import httpx
import openai
import pytest

from adapters import write_peft_adapter
from loraplex import LLM, LoRARequest, SamplingParams
from server.harness import API_KEY
from server.real_server import lora_manager, real_server

PROMPT = "the quick brown fox"
MAX_TOKENS = 12
HEADERS = {"Authorization": f"Bearer {API_KEY}"}


@pytest.fixture(scope="module")
def setup(tiny_checkpoint, tmp_path_factory):
    ckpt = str(tiny_checkpoint())
    root = tmp_path_factory.mktemp("inplace")

    def adapter(name, seed):
        return write_peft_adapter(root / name, seed=seed, base_model_name_or_path=ckpt,
                                  target_modules=("q_proj", "v_proj", "o_proj"))
    paths = {"v1": adapter("v1", 31), "v2": adapter("v2", 32), "other-1": adapter("o1", 33),
             "other-2": adapter("o2", 34)}
    argv = ["serve", ckpt, "--served-model-name", "tiny-base", "--enable-lora", "--max-loras", "2",
            "--max-cpu-loras", "2", "--api-key", API_KEY,
            "--lora-modules", f"other-1={paths['other-1']}", f"other-2={paths['other-2']}"]
    offline = LLM(ckpt, enable_lora=True, max_loras=2, max_cpu_loras=4)
    with real_server(argv, {"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "1", "VLLM_PLUGINS": ""}) as server:
        yield {"server": server, "paths": paths, "offline": offline, "root": root, "ckpt": ckpt}


def offline_text(setup, path, max_tokens=MAX_TOKENS, **params) -> str:
    # A name and id of its own per call: the offline engine would serve a cached copy otherwise.
    offline_text.calls = getattr(offline_text, "calls", 0) + 1
    lora = LoRARequest(f"ref-{offline_text.calls}", 1000 + offline_text.calls, str(path))
    out = setup["offline"].generate([PROMPT], SamplingParams(temperature=0, max_tokens=max_tokens, **params),
                                    lora_request=lora, use_tqdm=False)
    return out[0].outputs[0].text


def load(setup, name, path, inplace) -> httpx.Response:
    return httpx.post(setup["server"].base_url + "/v1/load_lora_adapter", headers=HEADERS, timeout=60,
                      json={"lora_name": name, "lora_path": str(path), "load_inplace": inplace})


def complete(setup, model, max_tokens=MAX_TOKENS) -> str:
    c = openai.OpenAI(base_url=setup["server"].base_url + "/v1", api_key=API_KEY, max_retries=0)
    return c.completions.create(model=model, prompt=PROMPT, max_tokens=max_tokens, temperature=0).choices[0].text


def models(setup) -> dict:
    r = httpx.get(setup["server"].base_url + "/v1/models", headers=HEADERS)
    return {m["id"]: m for m in r.json()["data"]}


async def stream_loop(base_url: str, model: str, stop: threading.Event, texts: list[str]) -> None:
    async with openai.AsyncOpenAI(base_url=base_url + "/v1", api_key=API_KEY, max_retries=0) as c:
        while not stop.is_set():
            stream = await c.completions.create(model=model, prompt=PROMPT, max_tokens=MAX_TOKENS,
                                                temperature=0, stream=True)
            texts.append("".join([chunk.choices[0].text async for chunk in stream if chunk.choices]))


@pytest.mark.parametrize("trial", range(2))
def test_the_last_swap_wins_under_streaming_traffic(setup, trial):
    name = f"swap-{trial}"
    expected = {v: offline_text(setup, setup["paths"][v]) for v in ("v1", "v2")}
    assert expected["v1"] != expected["v2"]
    assert load(setup, name, setup["paths"]["v1"], False).status_code == 200
    stop, texts = threading.Event(), []

    def clients():
        async def run():
            await asyncio.gather(*(stream_loop(setup["server"].base_url, name, stop, texts) for _ in range(4)))
        asyncio.run(run())
    traffic = threading.Thread(target=clients)
    traffic.start()
    try:
        for i in range(10):                      # v2, v1, ..., ending on v1
            time.sleep(0.1)
            r = load(setup, name, setup["paths"]["v2" if i % 2 == 0 else "v1"], True)
            assert r.status_code == 200, r.text
    finally:
        stop.set()
        traffic.join(120)
    assert texts and set(texts) <= set(expected.values()), "a stream mixed two versions"
    for _ in range(3):
        assert complete(setup, name) == expected["v1"]
    assert models(setup)[name]["root"] == str(setup["paths"]["v1"])
    # Out of the CPU cache and the slots (two other adapters, max_loras = max_cpu_loras = 2),
    # then back: reloaded from v1's directory, under v1's id.
    complete(setup, "other-1"), complete(setup, "other-2")
    assert complete(setup, name) == expected["v1"]
    # Only the current version is left in the engine: the nine replaced ones were dropped.
    lora_id = setup["server"].state.backend.get_adapter(name).lora_int_id
    versions = {i for i in lora_manager(setup["server"]).list_loras()
                if (r := lora_manager(setup["server"]).get_request(i)) is not None and r.lora_name == name}
    assert versions <= {lora_id}


def test_a_running_request_finishes_on_its_version_when_the_files_are_overwritten(setup, tmp_path):
    path = tmp_path / "same-path"
    shutil.copytree(setup["paths"]["v1"], path)
    long_v1 = offline_text(setup, path, max_tokens=40, ignore_eos=True)
    assert load(setup, "same-path", path, False).status_code == 200
    manager = lora_manager(setup["server"])

    async def run() -> str:
        async with openai.AsyncOpenAI(base_url=setup["server"].base_url + "/v1", api_key=API_KEY,
                                      max_retries=0) as c:
            stream = await c.completions.create(model="same-path", prompt=PROMPT, max_tokens=40, temperature=0,
                                                stream=True, extra_body={"ignore_eos": True})
            chunks = [await stream.__anext__()]
            # The new weights replace the old files in place, and are loaded in place, while it runs.
            # Holding the step lock keeps the request from finishing before the swap is done.
            with manager.step_lock:
                write_peft_adapter(path, seed=32, base_model_name_or_path=setup["ckpt"],
                                   target_modules=("q_proj", "v_proj", "o_proj"))
                swap = asyncio.create_task(asyncio.to_thread(load, setup, "same-path", path, True))
                await asyncio.sleep(0.3)
            assert (await swap).status_code == 200
            chunks += [chunk async for chunk in stream]
            return "".join(chunk.choices[0].text for chunk in chunks if chunk.choices)

    assert asyncio.run(run()) == long_v1
    assert complete(setup, "same-path") == offline_text(setup, setup["paths"]["v2"])


def test_a_failed_inplace_load_keeps_the_old_version_serving(setup, tmp_path):
    assert load(setup, "keeper", setup["paths"]["v1"], False).status_code == 200
    before = complete(setup, "keeper")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 8}')
    big = write_peft_adapter(tmp_path / "big", rank=64, base_model_name_or_path=setup["ckpt"])
    for bad, reason in ((broken, "no weights file"), (big, "rank 64"), (tmp_path / "nowhere", "does not exist")):
        r = load(setup, "keeper", bad, True)
        assert r.status_code == 400 and reason in r.json()["error"]["message"], r.text
        assert r.json()["error"]["param"] == "lora_path"
        assert complete(setup, "keeper") == before == offline_text(setup, setup["paths"]["v1"])
        assert models(setup)["keeper"]["root"] == str(setup["paths"]["v1"])
