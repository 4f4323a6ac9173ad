"""vLLM's tests/plugins/lora_resolvers/test_filesystem_resolver.py.

vLLM downloads a Qwen3 LoRA and a P-tuning adapter from the Hub; here they are written
in PEFT's format by tests/adapters.py, with the same names and base model."""

import asyncio
import json
import os
import shutil

import pytest

from adapters import write_peft_adapter
from loraplex.resolvers.filesystem import FilesystemResolver

MODEL_NAME = "Qwen/Qwen3-0.6B"
LORA_NAME = "charent/self_cognition_Alice"
PA_NAME = "swapnilbp/llama_tweet_ptune"


@pytest.fixture(scope="module")
def adapter_cache(request, tmpdir_factory):
    # Create dir that mimics the structure of the adapter cache (it does not exist yet).
    return tmpdir_factory.mktemp(request.module.__name__) / "adapter_cache"


@pytest.fixture(scope="module")
def qwen3_lora_files(tmp_path_factory):
    return str(write_peft_adapter(tmp_path_factory.mktemp("qwen3") / "lora", base_model_name_or_path=MODEL_NAME))


@pytest.fixture(scope="module")
def pa_files(tmp_path_factory):
    path = tmp_path_factory.mktemp("ptune") / "pa"
    path.mkdir()
    (path / "adapter_config.json").write_text(json.dumps({
        "peft_type": "P_TUNING", "task_type": "CAUSAL_LM", "num_virtual_tokens": 20,
        "base_model_name_or_path": MODEL_NAME}))
    (path / "adapter_model.bin").write_bytes(b"not read")
    return str(path)


def test_filesystem_resolver(adapter_cache, qwen3_lora_files):
    model_files = adapter_cache / LORA_NAME
    shutil.copytree(qwen3_lora_files, model_files)
    fs_resolver = FilesystemResolver(adapter_cache)
    assert fs_resolver is not None
    lora_request = asyncio.run(fs_resolver.resolve_lora(MODEL_NAME, LORA_NAME))
    assert lora_request is not None
    assert lora_request.lora_name == LORA_NAME
    assert lora_request.lora_path == os.path.join(adapter_cache, LORA_NAME)


def test_missing_adapter(adapter_cache):
    fs_resolver = FilesystemResolver(adapter_cache)
    assert fs_resolver is not None
    missing_lora_request = asyncio.run(fs_resolver.resolve_lora(MODEL_NAME, "foobar"))
    assert missing_lora_request is None


def test_nonlora_adapter(adapter_cache, pa_files):
    model_files = adapter_cache / PA_NAME
    shutil.copytree(pa_files, model_files)
    fs_resolver = FilesystemResolver(adapter_cache)
    assert fs_resolver is not None
    pa_request = asyncio.run(fs_resolver.resolve_lora(MODEL_NAME, PA_NAME))
    assert pa_request is None


def test_missing_cache_dir_alone(tmp_path):
    """vLLM's test_missing_adapter run on its own: the cache directory was never created."""
    fs_resolver = FilesystemResolver(tmp_path / "adapter_cache")
    assert asyncio.run(fs_resolver.resolve_lora(MODEL_NAME, "foobar")) is None
