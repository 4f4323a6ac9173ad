"""vLLM's tests/plugins/lora_resolvers/test_hf_hub_resolver.py, against loraplex's
Hub-compatible test server (HF_ENDPOINT) instead of huggingface.co.

The repos are made with the same names and layout: a repo with one LoRA at its root,
and a "library" repo with LoRAs in folders beside a README.md."""

import asyncio
import os

import pytest

from adapters import write_peft_adapter
from loraplex.resolvers.hf_hub import HfHubResolver
from servers.hub_server import HubTestServer

LORA_LIB_MODEL_NAME = "ibm-granite/granite-3.3-8b-instruct"
# Repo with multiple LoRAs contained in it
LORA_LIB = "ibm-granite/granite-3.3-8b-rag-agent-lib"
LORA_NAME = "ibm-granite/granite-3.3-8b-rag-agent-lib/answerability_prediction_lora"
NON_LORA_SUBPATH = "ibm-granite/granite-3.3-8b-rag-agent-lib/README.md"
INVALID_REPO_NAME = "thisrepodoesnotexist"

# Repo with only one LoRA in the root dir
LORA_REPO_MODEL_NAME = "meta-llama/Llama-2-7b-hf"
LORA_REPO = "yard1/llama-2-7b-sql-lora-test"


@pytest.fixture(autouse=True)
def hub(tmp_path, monkeypatch):
    server = HubTestServer(tmp_path / "hub").start()
    lib = server.repo_dir(LORA_LIB)
    for folder in ("answerability_prediction_lora", "citation_generation_lora"):
        write_peft_adapter(lib / folder, base_model_name_or_path=LORA_LIB_MODEL_NAME)
    (lib / "README.md").write_text("# a library of LoRA adapters\n")
    write_peft_adapter(server.repo_dir(LORA_REPO), base_model_name_or_path=LORA_REPO_MODEL_NAME)
    # What vLLM's test gets from its environment: the Hub, and where downloads go.
    monkeypatch.setenv("HF_ENDPOINT", server.endpoint)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setenv("VLLM_LORA_RESOLVER_CACHE_DIR", str(tmp_path / "adapter-cache"))
    yield server
    server.stop()


def download_dir(tmp_path, name):
    # loraplex: vLLM returns the adapter's folder inside the HF cache's snapshot
    # (models--org--repo/snapshots/<sha>/...). loraplex returns its adapter cache's copy,
    # VLLM_LORA_RESOLVER_CACHE_DIR/<name>: validated, recorded in a manifest, under the
    # cache's size bound, and holding that one adapter (docs/vllm.md). This helper is the
    # only change to vLLM's assertions.
    return os.path.join(tmp_path, "adapter-cache", name)


def resolve(resolver, base, name):
    return asyncio.run(resolver.resolve_lora(base, name))


def test_hf_resolver_with_direct_path(tmp_path):
    hf_resolver = HfHubResolver([LORA_REPO])
    assert hf_resolver is not None
    lora_request = resolve(hf_resolver, LORA_REPO_MODEL_NAME, LORA_REPO)
    assert lora_request.lora_name == LORA_REPO
    assert download_dir(tmp_path, LORA_REPO) in lora_request.lora_path
    assert "adapter_config.json" in os.listdir(lora_request.lora_path)


def test_hf_resolver_with_nested_paths(tmp_path):
    hf_resolver = HfHubResolver([LORA_LIB])
    assert hf_resolver is not None
    lora_request = resolve(hf_resolver, LORA_LIB_MODEL_NAME, LORA_NAME)
    assert lora_request is not None
    assert lora_request.lora_name == LORA_NAME
    assert download_dir(tmp_path, LORA_LIB) in lora_request.lora_path
    assert "adapter_config.json" in os.listdir(lora_request.lora_path)


def test_hf_resolver_with_multiple_repos(tmp_path):
    hf_resolver = HfHubResolver([LORA_LIB, LORA_REPO])
    assert hf_resolver is not None
    lora_request = resolve(hf_resolver, LORA_LIB_MODEL_NAME, LORA_NAME)
    assert lora_request is not None
    assert lora_request.lora_name == LORA_NAME
    assert download_dir(tmp_path, LORA_LIB) in lora_request.lora_path
    assert "adapter_config.json" in os.listdir(lora_request.lora_path)


def test_missing_adapter():
    hf_resolver = HfHubResolver([LORA_LIB])
    assert hf_resolver is not None
    assert resolve(hf_resolver, LORA_LIB_MODEL_NAME, "foobar") is None


def test_nonlora_adapter():
    hf_resolver = HfHubResolver([LORA_LIB])
    assert hf_resolver is not None
    assert resolve(hf_resolver, LORA_LIB_MODEL_NAME, NON_LORA_SUBPATH) is None


def test_invalid_repo():
    hf_resolver = HfHubResolver([LORA_LIB])
    assert hf_resolver is not None
    assert resolve(hf_resolver, INVALID_REPO_NAME, f"{INVALID_REPO_NAME}/foo") is None


def test_trailing_slash(tmp_path):
    hf_resolver = HfHubResolver([LORA_LIB])
    assert hf_resolver is not None
    lora_request = resolve(hf_resolver, LORA_LIB_MODEL_NAME, f"{LORA_NAME}/")
    assert lora_request is not None
    assert lora_request.lora_name == f"{LORA_NAME}/"
    assert download_dir(tmp_path, LORA_LIB) in lora_request.lora_path
    assert "adapter_config.json" in os.listdir(lora_request.lora_path)


def test_adapter_for_another_base_model_is_not_mine():
    """vLLM's resolver returns None for an adapter trained on another model; so does ours."""
    hf_resolver = HfHubResolver([LORA_LIB, LORA_REPO])
    assert resolve(hf_resolver, LORA_LIB_MODEL_NAME, LORA_REPO) is None
