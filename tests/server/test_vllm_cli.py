"""`loraplex serve` LoRA flags as vLLM defines them: --max-loras 1 by default, vLLM's
--max-lora-rank values, --lora-modules with a Hub repo id, --lora-dtype,
--lora-target-modules, and VLLM_SKIP_MODEL_NAME_VALIDATION."""

from __future__ import annotations

import logging
from pathlib import Path

import httpx
import pytest

from adapters import write_peft_adapter
from loraplex import LLM, LoRARequest, SamplingParams
from loraplex.core.lora.layers import LoRALinear
from loraplex.errors import AdapterInvalidError, ConfigError
from loraplex.server.app import build_app
from loraplex.server.cli import build_parser
from loraplex.server.demo_mode import apply_demo_args
from loraplex.server.serve import VLLM_MAX_LORA_RANKS, build_state, engine_config_from_args
from plugin_helpers import isolated_plugins  # noqa: F401
from server.conftest import FakeChain
from server.fake_engine import FakeEngine, expected_text, model_offset
from server.harness import ServerThread
from servers.hub_server import HubTestServer


def serve_args(*argv):
    return build_parser().parse_args(["serve", *argv])


def test_max_loras_defaults_to_one_as_in_vllm():
    config = engine_config_from_args(serve_args("/m", "--enable-lora"))
    assert (config.max_loras, config.max_cpu_loras, config.max_lora_rank) == (1, 1, 16)


def test_demo_keeps_room_for_its_adapters():
    """--demo (and the README's command it equals) batch all three shipped adapters."""
    args = serve_args("--demo")
    apply_demo_args(args, {})
    assert engine_config_from_args(args).max_loras == 4
    args = serve_args("--demo", "--max-loras", "2")
    apply_demo_args(args, {})
    assert engine_config_from_args(args).max_loras == 2
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    assert "--served-model-name loraplex-demo-base --enable-lora \\\n    --max-loras 4" in readme


@pytest.mark.parametrize("rank", VLLM_MAX_LORA_RANKS)
def test_every_vllm_max_lora_rank_is_accepted(rank, isolated_plugins, caplog):  # noqa: F811
    args = serve_args("/m", "--enable-lora", "--max-lora-rank", str(rank))
    assert engine_config_from_args(args).max_lora_rank == rank
    with caplog.at_level(logging.WARNING):
        build_state(args, engine=FakeEngine())
    assert "is not one of vLLM's values" not in caplog.text


def test_other_max_lora_rank_is_accepted_and_said(isolated_plugins, caplog):  # noqa: F811
    with caplog.at_level(logging.WARNING):
        build_state(serve_args("/m", "--enable-lora", "--max-lora-rank", "24"), engine=FakeEngine())
    assert "--max-lora-rank 24 is not one of vLLM's values (1, 8, 16, 32, 64, 128, 256, 320, 512)" in caplog.text


def test_large_vllm_rank_runs(tiny_checkpoint, tmp_path):
    """Rank 320 (one of vLLM's values, not a power of two) through the engine."""
    ckpt = tiny_checkpoint()
    adapter = write_peft_adapter(tmp_path / "r320", rank=320, alpha=4 * 320, base_model_name_or_path=str(ckpt),
                                 target_modules=("q_proj", "v_proj", "o_proj", "down_proj"))
    llm = LLM(str(ckpt), enable_lora=True, max_loras=1, max_lora_rank=320, dtype="float32")
    params = SamplingParams(temperature=0, max_tokens=4)
    [with_lora] = llm.generate(["hello"], params, lora_request=LoRARequest("r320", 1, str(adapter)), use_tqdm=False)
    [base] = llm.generate(["hello"], params, use_tqdm=False)
    assert with_lora.outputs[0].token_ids != base.outputs[0].token_ids


def test_lora_dtype_and_target_modules_reach_the_engine_config():
    config = engine_config_from_args(serve_args("/m", "--enable-lora", "--lora-dtype", "bfloat16",
                                                "--lora-target-modules", "o_proj", "q_proj", "v_proj"))
    assert config.lora_dtype == "bfloat16"
    assert config.lora_target_modules == ("qkv_proj", "o_proj")   # PEFT names map to the fused layer
    with pytest.raises(ConfigError, match="'lm_head' is not a LoRA target module of this model; choose from "
                                          "qkv_proj, o_proj, gate_up_proj, down_proj"):
        engine_config_from_args(serve_args("/m", "--enable-lora", "--lora-target-modules", "lm_head"))


def test_lora_dtype_other_than_the_models_is_refused(tiny_checkpoint):
    ckpt = str(tiny_checkpoint())
    with pytest.raises(ConfigError, match=r"lora_dtype=bfloat16 \(--lora-dtype\), but the model runs in "
                                          r"torch.float32"):
        LLM(ckpt, enable_lora=True, dtype="float32", lora_dtype="bfloat16")
    LLM(ckpt, enable_lora=True, dtype="float32", lora_dtype="float32")   # the model's dtype: fine


def test_target_modules_restrict_which_layers_carry_lora(tiny_checkpoint, tmp_path):
    ckpt = str(tiny_checkpoint())
    qv = write_peft_adapter(tmp_path / "qv", seed=3, base_model_name_or_path=ckpt)   # q_proj, v_proj
    mlp = write_peft_adapter(tmp_path / "mlp", seed=4, base_model_name_or_path=ckpt,
                             target_modules=("q_proj", "down_proj"))
    params = SamplingParams(temperature=0, max_tokens=6)
    restricted = LLM(ckpt, enable_lora=True, dtype="float32", lora_target_modules=("qkv_proj",))
    wrapped = [m for m in restricted.llm_engine.runner.model.modules() if isinstance(m, LoRALinear)]
    layers = len(restricted.llm_engine.runner.model.model.layers)
    assert len(wrapped) == layers and all(m.stack.target.name == "qkv_proj" for m in wrapped)
    [out] = restricted.generate(["the rows"], params, lora_request=LoRARequest("qv", 1, str(qv)), use_tqdm=False)
    full = LLM(ckpt, enable_lora=True, dtype="float32")
    [ref] = full.generate(["the rows"], params, lora_request=LoRARequest("qv", 1, str(qv)), use_tqdm=False)
    assert out.outputs[0].token_ids == ref.outputs[0].token_ids
    with pytest.raises(AdapterInvalidError, match=r"adapts 'down_proj' \(part of down_proj\), but this engine "
                                                  r"applies LoRA only to qkv_proj \(lora_target_modules"):
        restricted.generate(["x"], params, lora_request=LoRARequest("mlp", 2, str(mlp)), use_tqdm=False)


# ---- --lora-modules with a Hub repo id ---------------------------------------------------

@pytest.fixture
def hub(tmp_path, monkeypatch, isolated_plugins):  # noqa: F811 (it clears VLLM_LORA_RESOLVER_*: first)
    server = HubTestServer(tmp_path / "hub").start()
    monkeypatch.setenv("HF_ENDPOINT", server.endpoint)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setenv("VLLM_LORA_RESOLVER_CACHE_DIR", str(tmp_path / "adapters"))
    yield server
    server.stop()


def test_lora_modules_take_a_hub_repo_id(hub, tmp_path):
    write_peft_adapter(hub.repo_dir("acme/sql-lora"), seed=5)
    write_peft_adapter(hub.repo_dir("acme/library") / "french", seed=6)
    args = serve_args("/m", "--enable-lora", "--lora-modules", "sql=acme/sql-lora",
                      '{"name": "fr", "path": "acme/library/french", "is_3d_lora_weight": false}',
                      f"local={write_peft_adapter(tmp_path / 'local')}")
    state = build_state(args, engine=FakeEngine())
    assert state.backend.static_adapters == [
        ("sql", str(tmp_path / "adapters" / "acme" / "sql-lora"), None),
        ("fr", str(tmp_path / "adapters" / "acme" / "library" / "french"), None),
        ("local", str(tmp_path / "local"), None)]
    assert (tmp_path / "adapters" / "acme" / "sql-lora" / "adapter_model.safetensors").is_file()


@pytest.mark.parametrize("path, message", [
    ("acme/nothing", "the Hugging Face Hub failed|does not exist"),
    ("acme/sql-lora/no-such-folder", "has no adapter_config.json at 'acme/sql-lora/no-such-folder'"),
])
def test_lora_modules_hub_errors_stop_the_start_up(hub, path, message):
    write_peft_adapter(hub.repo_dir("acme/sql-lora"))
    with pytest.raises(ConfigError, match=f"--lora-modules x={path}: not a local directory.*({message})"):
        build_state(serve_args("/m", "--enable-lora", "--lora-modules", f"x={path}"), engine=FakeEngine())


# ---- VLLM_SKIP_MODEL_NAME_VALIDATION -------------------------------------------------------

@pytest.mark.parametrize("skip", [False, True])
def test_skip_model_name_validation(skip, isolated_plugins, monkeypatch, tmp_path):  # noqa: F811
    monkeypatch.setenv("VLLM_ALLOW_RUNTIME_LORA_UPDATING", "true")
    if skip:
        monkeypatch.setenv("VLLM_SKIP_MODEL_NAME_VALIDATION", "1")
    adapter = write_peft_adapter(tmp_path / "sql-lora")
    engine, chain = FakeEngine(), FakeChain({})
    args = serve_args("tiny-base", "--enable-lora", "--lora-modules", f"sql-lora={adapter}")

    def make_app():
        state = build_state(args, engine=engine)
        state.backend.resolver_chain = chain
        return build_app(state)

    with ServerThread(make_app) as server:
        def ask(model):
            return httpx.post(server.base_url + "/v1/completions",
                              json={"model": model, "prompt": "abc", "max_tokens": 3, "temperature": 0})
        unknown, adapter_reply = ask("gateway-alias"), ask("sql-lora")
    assert adapter_reply.status_code == 200
    assert adapter_reply.json()["choices"][0]["text"] == expected_text(
        model_offset(LoRARequest("sql-lora", 1, "/x")), [ord(c) for c in "abc"], 3)
    if not skip:
        assert unknown.status_code == 404 and chain.calls == ["gateway-alias"]
        return
    # Any other name is the base model, without asking the resolvers (as vLLM does).
    assert unknown.status_code == 200 and chain.calls == []
    assert unknown.json()["choices"][0]["text"] == expected_text(0, [ord(c) for c in "abc"], 3)
    assert unknown.json()["model"] == "tiny-base"
