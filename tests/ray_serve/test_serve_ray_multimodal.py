"""Images through `loraplex serve-ray`: a subprocess that starts a local Ray cluster with one CPU
replica of a tiny LLaVA behind the ingress, a default adapter for images and another adapter by
name. The ingress reads the image and renders the prompt, the replica runs it; outputs must equal
the offline LLM's (itself tested against transformers and PEFT)."""

from __future__ import annotations

import json
import os

import openai
import pytest
from mm_models import data_url, hf_llava, png_bytes, random_image, write_mm_peft_lora

from loraplex import LLM, LoRARequest, SamplingParams
from loraplex.lora_request import lora_id_for_name
from server.serve_process import ServeProcess

API_KEY = "ray-mm-key"
MAX_TOKENS = 5
GREEDY = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)


@pytest.fixture(scope="module")
def llava_cluster(tiny_llava, tmp_path_factory):
    root = tmp_path_factory.mktemp("serve-ray-llava")
    model = hf_llava(tiny_llava)
    image_lora, other_lora = write_mm_peft_lora(model, root / "image"), write_mm_peft_lora(model, root / "other", seed=3)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VLLM_", "LORAPLEX_"))}
    env["RAY_enable_metrics_collection"] = "0"   # as in test_serve_ray.py
    argv = [str(tiny_llava), "--served-model-name", "base", "--device", "cpu", "--max-model-len", "128",
            "--enable-lora", "--max-lora-rank", "8", "--lora-modules", f"other={other_lora}",
            "--default-mm-loras", json.dumps({"image": str(image_lora)}), "--limit-mm-per-prompt", '{"image": 2}',
            "--api-key", API_KEY,
            "--host", "127.0.0.1", "--replicas", "1", "--ray-replica-cpus", "0.5"]
    server = ServeProcess(argv, env, root / "serve-ray.log", command="serve-ray")
    try:
        server.wait_ready(timeout_s=300)
        offline = LLM(str(tiny_llava), device="cpu", max_model_len=128, enable_lora=True, max_lora_rank=8,
                      default_mm_loras={"image": str(image_lora)})
        yield {"server": server, "offline": offline, "image_lora": str(image_lora), "other_lora": str(other_lora)}
    finally:
        server.stop(grace_s=60)


def _client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url + "/v1", api_key=API_KEY, max_retries=0, timeout=120)


def _chat(client, content, model="base") -> str:
    out = client.chat.completions.create(model=model, messages=[{"role": "user", "content": content}],
                                         max_tokens=MAX_TOKENS, temperature=0)
    return out.choices[0].message.content


def _offline(llm: LLM, content, lora=None) -> str:
    return llm.chat([{"role": "user", "content": content}], GREEDY, lora_request=lora, use_tqdm=False)[0].outputs[0].text


def _image(seed: int) -> dict:
    return {"type": "image_url", "image_url": {"url": data_url(png_bytes(random_image(seed)), "image/png")}}


def test_images_through_ray_match_offline_with_the_default_and_named_adapters(llava_cluster):
    client, offline = _client(llava_cluster["server"]), llava_cluster["offline"]
    models = {m.id: m for m in client.models.list().data}
    assert models["image"].root == llava_cluster["image_lora"]      # the replica's default adapter, listed
    content = [_image(1), {"type": "text", "text": "what is in the picture?"}]
    served = _chat(client, content)
    assert served == _offline(offline, content)                      # the default adapter applied
    other = LoRARequest("other", lora_id_for_name("other"), llava_cluster["other_lora"])
    assert _chat(client, content, model="other") == _offline(offline, content, lora=other) != served
    two = [_image(2), _image(3), {"type": "text", "text": "compare"}]
    assert _chat(client, two) == _offline(offline, two)
    text = [{"type": "text", "text": "hello there"}]
    assert _chat(client, text) == _offline(offline, text)            # text only: no default adapter


def test_a_bad_image_through_ray_is_a_400_and_the_cluster_keeps_serving(llava_cluster):
    client = _client(llava_cluster["server"])
    broken = {"type": "image_url", "image_url": {"url": data_url(b"not a png", "image/png")}}
    with pytest.raises(openai.BadRequestError, match="image"):
        _chat(client, [broken, {"type": "text", "text": "what is it?"}])
    too_many = [_image(4)] * 3 + [{"type": "text", "text": "three"}]
    with pytest.raises(openai.BadRequestError, match="at most 2"):
        _chat(client, too_many)
    assert _chat(client, [_image(1), {"type": "text", "text": "again"}])
