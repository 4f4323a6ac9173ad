"""`loraplex serve`'s flags and environment as build_state reads them, over the fake engine:
runtime adapter updating off, and the lineage that served names and base_model_name give."""

import json
from contextlib import contextmanager
from pathlib import Path

import httpx
import openai
import pytest

from loraplex.plugins.loader import reset_plugins
from loraplex.server.app import build_app
from loraplex.server.cli import build_parser
from loraplex.server.serve import build_state
from server.fake_engine import FakeEngine
from server.harness import ServerThread
from server.real_server import patched_env


@contextmanager
def serve(argv: list[str], env: dict[str, str]):
    """`loraplex serve ARGV` with `env` set, over the fake engine; plugins reloaded for `env`."""
    args = build_parser().parse_args(["serve", *argv])
    with patched_env({"VLLM_API_KEY": "", **env}):
        reset_plugins()
        try:
            with ServerThread(lambda: build_app(build_state(args, engine=FakeEngine()))) as server:
                yield server
        finally:
            reset_plugins()


def test_without_runtime_updating_no_management_routes_and_no_resolution(adapter_dirs):
    # The filesystem resolver could find 'sql-lora' here; with updating off it must not be asked.
    cache = Path(adapter_dirs["sql-lora"]).parent
    env = {"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "False", "VLLM_PLUGINS": "lora_filesystem_resolver",
           "VLLM_LORA_RESOLVER_CACHE_DIR": str(cache)}
    with serve(["/models/tiny", "--served-model-name", "tiny-base", "--enable-lora"], env) as server:
        client = openai.OpenAI(base_url=server.base_url + "/v1", api_key="none", max_retries=0)
        with pytest.raises(openai.NotFoundError) as e:
            client.completions.create(model="sql-lora", prompt="a", max_tokens=1)
        assert e.value.body["message"] == "The model 'sql-lora' does not exist."
        for route, body in (("load", {"lora_name": "x", "lora_path": adapter_dirs["chat-lora"]}),
                            ("unload", {"lora_name": "x"})):
            r = httpx.post(f"{server.base_url}/v1/{route}_lora_adapter", json=body)
            assert r.status_code == 404 and r.json()["error"]["code"] == 404
        assert [m.id for m in client.models.list().data] == ["tiny-base"]
        assert client.completions.create(model="tiny-base", prompt="a", max_tokens=1).usage


def test_base_model_name_sets_the_adapters_parent(adapter_dirs):
    static = json.dumps({"name": "sql-lora", "path": adapter_dirs["sql-lora"], "base_model_name": "alias"})
    argv = ["/models/tiny", "--served-model-name", "tiny-base", "alias", "--enable-lora",
            "--lora-modules", static, f"chat-lora={adapter_dirs['chat-lora']}"]
    with serve(argv, {"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True", "VLLM_PLUGINS": ""}) as server:
        for name, base in (("extra-lora", "alias"), ("other-lora", "not-served")):
            r = httpx.post(server.base_url + "/v1/load_lora_adapter", json={
                "lora_name": name, "lora_path": adapter_dirs["extra-lora"], "base_model_name": base})
            assert r.status_code == 200, r.text
        client = openai.OpenAI(base_url=server.base_url + "/v1", api_key="none", max_retries=0)
        parents = {m.id: m.parent for m in client.models.list().data}
    # A base_model_name that is not a served name falls back to the first served name.
    assert parents == {"tiny-base": None, "alias": None, "sql-lora": "alias", "chat-lora": "tiny-base",
                       "extra-lora": "alias", "other-lora": "tiny-base"}
