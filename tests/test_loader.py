"""Checkpoint loading: config parsing, dtype rule, fused projections, and clear errors."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from runner_helpers import BlockAllocator, make_runner, new_sequences, prefill, random_prompts, relative_error

from loraplex.core.config import EngineConfig
from loraplex.core.model_config import SUPPORTED_ARCHITECTURES, ModelConfig, resolve_dtype
from loraplex.errors import ConfigError, UnsupportedModelError


@pytest.fixture
def llama_copy(tiny_checkpoint, tmp_path):
    """A private copy of the tiny Llama checkpoint that a test may break."""
    return shutil.copytree(tiny_checkpoint("llama"), tmp_path / "llama")


def edit_config(path, **changes):
    config = json.loads((path / "config.json").read_text())
    config.update(changes)
    (path / "config.json").write_text(json.dumps(config))


def edit_weights(path, edit):
    tensors = load_file(str(path / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})


def test_fused_projections_hold_checkpoint_matrices(tiny_checkpoint):
    path = tiny_checkpoint("qwen2")
    runner = make_runner(path)
    tensors = load_file(str(path / "model.safetensors"))
    attn = runner.model.model.layers[1].self_attn
    assert attn.qkv_proj.output_slices == (64, 32, 32) and attn.qkv_proj.slice_names == ("q", "k", "v")
    for name in ("q", "k", "v"):
        start, width = attn.qkv_proj.slice_offset(name)
        assert torch.equal(attn.qkv_proj.weight[start:start + width], tensors[f"model.layers.1.self_attn.{name}_proj.weight"])
        assert torch.equal(attn.qkv_proj.bias[start:start + width], tensors[f"model.layers.1.self_attn.{name}_proj.bias"])
    mlp = runner.model.model.layers[1].mlp
    assert mlp.gate_up_proj.output_slices == (128, 128) and mlp.down_proj.output_slices == (64,)
    assert torch.equal(mlp.gate_up_proj.weight[128:], tensors["model.layers.1.mlp.up_proj.weight"])


def test_tied_embeddings_share_one_tensor(tiny_checkpoint):
    runner = make_runner(tiny_checkpoint("llama", tie_word_embeddings=True))
    assert runner.model.lm_head.weight is runner.model.model.embed_tokens.weight


def test_runner_exposes_model_facts(tiny_checkpoint):
    runner = make_runner(tiny_checkpoint("llama"), max_model_len=None, kv_cache_bytes=None, max_num_seqs=2)
    assert runner.max_model_len == 256 and runner.vocab_size == 300
    assert runner.eos_token_id == 2 and runner.eos_token_ids == (2,) and runner.bos_token_id == 1
    assert runner.device == torch.device("cpu") and runner.dtype == torch.float32
    # CPU default budget: enough for max_num_seqs full-length sequences when under 1 GiB.
    assert runner.num_kv_blocks == 2 * 256 // runner.block_size
    k_cache, v_cache = runner.kv_cache.layers[0]
    assert k_cache.shape == (runner.num_kv_blocks, runner.block_size, 2, 16) == v_cache.shape


def test_bfloat16_checkpoint_loads_in_requested_dtypes(tiny_checkpoint):
    path = tiny_checkpoint("llama", dtype=torch.bfloat16)
    prompt = random_prompts([11], 300)
    logits = {}
    for dtype in ("auto", "bfloat16"):
        runner = make_runner(path, dtype=dtype)
        assert runner.dtype == (torch.float32 if dtype == "auto" else torch.bfloat16)  # CPU: auto is float32
        assert runner.model.model.layers[0].self_attn.qkv_proj.weight.dtype == runner.dtype
        assert runner.kv_cache.storage.dtype == runner.dtype
        logits[dtype] = prefill(runner, BlockAllocator(runner.num_kv_blocks, runner.block_size), new_sequences(prompt))
    assert logits["bfloat16"].dtype == torch.bfloat16    # the model's dtype; the sampler widens where needed
    assert relative_error(logits["bfloat16"], logits["auto"]) < 5e-2


def test_dtype_rule():
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert resolve_dtype("auto", "float16", cuda) == torch.float16
    assert resolve_dtype("auto", None, cuda) == torch.bfloat16
    assert resolve_dtype("auto", "bfloat16", cpu) == torch.float32
    assert resolve_dtype("float16", "bfloat16", cpu) == torch.float16
    with pytest.raises(ConfigError, match="float64"):
        resolve_dtype("auto", "float64", cuda)
    with pytest.raises(ConfigError, match="dtype must be one of"):
        EngineConfig(model="x", dtype="float64")


def test_old_style_rope_config_and_generation_eos():
    raw = {"architectures": ["LlamaForCausalLM"], "vocab_size": 10, "hidden_size": 8, "intermediate_size": 16,
           "num_hidden_layers": 1, "num_attention_heads": 2, "max_position_embeddings": 64, "rope_theta": 500000.0,
           "rope_scaling": {"type": "linear", "factor": 2.0}, "eos_token_id": 5}
    cfg = ModelConfig.from_dict(raw, {"eos_token_id": [5, 7]})
    assert cfg.rope_theta == 500000.0 and cfg.rope_scaling["rope_type"] == "linear"
    assert cfg.num_kv_heads == 2 and cfg.head_dim == 4 and cfg.eos_token_ids == (5, 7)


def test_unsupported_architecture_lists_supported(llama_copy):
    edit_config(llama_copy, architectures=["GPT2LMHeadModel"], model_type="gpt2")
    with pytest.raises(UnsupportedModelError) as info:
        make_runner(llama_copy)
    for name in ("GPT2LMHeadModel", *SUPPORTED_ARCHITECTURES):
        assert name in str(info.value)


def test_unsupported_rope_type(llama_copy):
    edit_config(llama_copy, rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0})
    with pytest.raises(UnsupportedModelError, match="yarn.*llama3"):
        make_runner(llama_copy)


def test_missing_tensor_is_named(llama_copy):
    edit_weights(llama_copy, lambda t: t.pop("model.layers.1.self_attn.v_proj.weight"))
    with pytest.raises(ConfigError, match=r"model\.layers\.1\.self_attn\.v_proj\.weight"):
        make_runner(llama_copy)


def test_unexpected_tensor_is_named(llama_copy):
    edit_weights(llama_copy, lambda t: t.update({"model.layers.0.mlp.extra_proj.weight": torch.ones(2, 2)}))
    with pytest.raises(ConfigError, match=r"model\.layers\.0\.mlp\.extra_proj\.weight"):
        make_runner(llama_copy)


def test_misshaped_tensor_is_named(llama_copy):
    edit_weights(llama_copy, lambda t: t.update({"model.layers.0.mlp.up_proj.weight": torch.ones(100, 64)}))
    with pytest.raises(ConfigError, match=r"up_proj\.weight.*\(100, 64\).*\(128, 64\)"):
        make_runner(llama_copy)


def test_stale_rotary_buffer_is_ignored(llama_copy):
    edit_weights(llama_copy, lambda t: t.update({"model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(8)}))
    assert make_runner(llama_copy).num_kv_blocks > 0


def test_missing_files_and_shards(tiny_checkpoint, tmp_path):
    with pytest.raises(ConfigError, match="no config.json"):
        make_runner(tmp_path)
    sharded = shutil.copytree(tiny_checkpoint("llama", num_shards=3), tmp_path / "sharded")
    next(sharded.glob("model-00002-*.safetensors")).unlink()
    with pytest.raises(ConfigError, match="model-00002-of-.*missing"):
        make_runner(sharded)
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(sharded / "config.json", bare / "config.json")
    with pytest.raises(ConfigError, match="no \\*.safetensors"):
        make_runner(bare)


def test_bad_engine_settings(tiny_checkpoint):
    path = tiny_checkpoint("llama")
    with pytest.raises(ConfigError, match="max_position_embeddings=256"):
        make_runner(path, max_model_len=1000)
    with pytest.raises(ConfigError, match="cannot hold one sequence"):
        make_runner(path, kv_cache_bytes=1000)
    with pytest.raises(ConfigError, match="not a torch device"):
        make_runner(path, device="gpu0")
