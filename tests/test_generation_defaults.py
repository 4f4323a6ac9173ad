"""Default sampling parameters from the checkpoint's generation_config.json (vLLM's
--generation-config): the same recommendations transformers reads, applied to what a request
leaves unset, offline and through the server."""

import json
import shutil

import httpx
import pytest

from loraplex import LLM, SamplingParams
from loraplex.core.generation_defaults import KEYS, generation_defaults
from loraplex.demo import demo_model_path
from loraplex.errors import ConfigError
from server.real_server import real_server

PROMPT = "Input: hello world\nOutput: "


@pytest.mark.parametrize("values", [
    {"temperature": 0.6, "top_p": 0.9, "max_new_tokens": 7, "do_sample": True},
    {"top_k": 50, "temperature": 1.0, "repetition_penalty": 1.1, "min_p": 0.05, "do_sample": True},
    {"top_k": 20, "top_p": 1.0, "do_sample": True},
    {},
])
def test_the_recommendations_are_those_transformers_reads(tmp_path, values):
    from transformers import GenerationConfig

    GenerationConfig(**values).save_pretrained(tmp_path)
    diff = GenerationConfig.from_pretrained(tmp_path).to_diff_dict()
    expected = {k: diff[k] for k in KEYS if diff.get(k) is not None}
    if "max_new_tokens" in expected:
        expected["max_tokens"] = expected.pop("max_new_tokens")
    assert generation_defaults(tmp_path) == expected
    assert generation_defaults(tmp_path, "vllm") == {}
    assert generation_defaults(tmp_path, "vllm", {"temperature": 0.3}) == {"temperature": 0.3}
    assert generation_defaults(tmp_path, str(tmp_path), {"top_p": 0.5}) == {**expected, "top_p": 0.5}


def test_bad_settings_are_refused_saying_what_is_wrong(tmp_path):
    (tmp_path / "generation_config.json").write_text(json.dumps({"temperature": 7.0}))
    with pytest.raises(ConfigError, match="temperature"):
        generation_defaults(tmp_path)
    with pytest.raises(ConfigError, match="unknown key"):
        generation_defaults(tmp_path, "vllm", {"temprature": 0.5})
    with pytest.raises(ConfigError, match="not a directory holding a generation_config.json"):
        generation_defaults(tmp_path, str(tmp_path / "nope"))
    (tmp_path / "generation_config.json").write_text("{")
    with pytest.raises(ConfigError, match="not valid JSON"):
        generation_defaults(tmp_path)


@pytest.fixture(scope="module")
def model_with_recommendations(tmp_path_factory):
    """The demo base model whose generation_config.json recommends top_k 1 (greedy whatever the
    temperature) and at most 5 new tokens."""
    path = tmp_path_factory.mktemp("gen") / "model"
    shutil.copytree(demo_model_path(), path)
    config = json.loads((path / "generation_config.json").read_text())
    (path / "generation_config.json").write_text(json.dumps({**config, "top_k": 1, "max_new_tokens": 5,
                                                             "temperature": 0.9}))
    return path


def test_llm_uses_them_when_given_no_sampling_params(model_with_recommendations):
    greedy = LLM(str(demo_model_path()), device="cpu").generate(
        PROMPT, SamplingParams(temperature=0, max_tokens=16), use_tqdm=False)[0].outputs[0].token_ids
    llm = LLM(str(model_with_recommendations), device="cpu")
    defaults = llm.get_default_sampling_params()
    assert (defaults.top_k, defaults.max_tokens, defaults.temperature) == (1, 5, 0.9)
    assert llm.generate(PROMPT, use_tqdm=False)[0].outputs[0].token_ids == greedy[:5]
    # Explicit SamplingParams are the caller's: the recommendations do not apply.
    assert len(llm.generate(PROMPT, SamplingParams(temperature=0, max_tokens=8), use_tqdm=False)[0]
               .outputs[0].token_ids) == min(8, len(greedy))
    plain = LLM(str(model_with_recommendations), device="cpu", generation_config="vllm")
    assert plain.get_default_sampling_params() == SamplingParams()
    overridden = LLM(str(model_with_recommendations), device="cpu", override_generation_config={"max_new_tokens": 2})
    assert overridden.generate(PROMPT, use_tqdm=False)[0].outputs[0].token_ids == greedy[:2]


def test_the_server_fills_what_requests_leave_unset(model_with_recommendations):
    greedy = LLM(str(demo_model_path()), device="cpu").generate(
        PROMPT, SamplingParams(temperature=0, max_tokens=16), use_tqdm=False)[0].outputs[0].text

    def complete(server, **body):
        r = httpx.post(server.base_url + "/v1/completions", json={"model": "demo", "prompt": PROMPT, **body},
                       timeout=60)
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]["text"], r.json()["usage"]["completion_tokens"]

    argv = ["serve", str(model_with_recommendations), "--served-model-name", "demo", "--device", "cpu"]
    with real_server(argv, {}) as server:
        assert complete(server) == (greedy[:5], 5)                       # top_k 1 and at most 5 tokens
        assert complete(server, temperature=1.0, seed=3)[0] == greedy[:5]
        assert complete(server, max_tokens=3)[1] == 3
        assert complete(server, max_tokens=12)[1] == 5                    # max_new_tokens caps a request's
        r = httpx.post(server.base_url + "/v1/chat/completions", timeout=60,
                       json={"model": "demo", "messages": [{"role": "user", "content": "hello"}]})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] <= 5, r.text
    with real_server([*argv, "--generation-config", "vllm"], {}) as server:
        assert complete(server, temperature=0)[1] > 5
    with real_server([*argv, "--override-generation-config", '{"max_new_tokens": 2}'], {}) as server:
        assert complete(server) == (greedy[:2], 2)
