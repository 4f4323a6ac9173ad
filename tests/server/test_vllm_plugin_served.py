"""A resolver package written for vLLM (examples/vllm-s3-lora-resolver: entry point in
vllm.general_plugins, `vllm.*` imports, s3fs), pip-installed unchanged, serving an adapter
from a moto S3 bucket to the official openai client through `loraplex serve`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import openai
import pytest

from adapters import write_peft_adapter
from plugin_helpers import pip_install
from servers.fixtures import s3_server  # noqa: F401 (fixture)
from servers.s3_server import upload_dir
from server.serve_process import ServeProcess

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "examples" / "vllm-s3-lora-resolver"
BUCKET = "vllm-plugin-bucket"


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """The package installed with pip into a private target directory, as a user installs it."""
    target = pip_install(EXAMPLE, tmp_path_factory.mktemp("vllm-plugin"))
    [dist_info] = target.glob("vllm_s3_lora_resolver-*.dist-info")
    assert "[vllm.general_plugins]" in (dist_info / "entry_points.txt").read_text()
    return target


@pytest.fixture(scope="module")
def served(site, tiny_checkpoint, tmp_path_factory, s3_server):  # noqa: F811
    ckpt = str(tiny_checkpoint())
    root = tmp_path_factory.mktemp("vllm-plugin-serve")
    adapter = write_peft_adapter(root / "sql-lora", seed=21, base_model_name_or_path=ckpt,
                                 target_modules=("q_proj", "v_proj", "down_proj"))
    s3_server.client().create_bucket(Bucket=BUCKET)
    upload_dir(s3_server.client(), BUCKET, "loras/sql-lora", adapter)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "VLLM_", "LORAPLEX_"))}
    env.update(s3_server.env())
    env.update({"PYTHONPATH": str(site), "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "true",
                "VLLM_PLUGINS": "s3_lora_resolver",
                "S3_PATH_TEMPLATE": f"s3://{BUCKET}/loras/{{lora_name}}",
                "LOCAL_PATH_TEMPLATE": str(root / "downloads" / "{lora_name}")})
    server = ServeProcess([ckpt, "--enable-lora", "--lora-modules", f"same-files={adapter}",
                           "--max-loras", "2", "--max-cpu-loras", "2", "--host", "127.0.0.1"],
                          env, root / "server.log")
    try:
        server.wait_ready()
        yield {"server": server, "env": env, "root": root, "s3": s3_server, "ckpt": ckpt}
    finally:
        server.stop()


def complete(served, model):
    client = openai.OpenAI(base_url=served["server"].base_url + "/v1", api_key="unused", max_retries=0)
    return client.completions.create(model=model, prompt="select the rows where", max_tokens=8,
                                     temperature=0).choices[0].text


def test_adapter_from_s3_is_served_through_the_vllm_plugin(served):
    via_plugin = complete(served, "sql-lora")
    # The same files loaded at start-up give the same text; the base model another one.
    assert via_plugin == complete(served, "same-files")
    assert via_plugin != complete(served, served["ckpt"])
    assert (served["root"] / "downloads" / "sql-lora" / "adapter_config.json").is_file()
    assert complete(served, "sql-lora") == via_plugin   # loaded now: no second download
    assert served["s3"].downloads(BUCKET, "loras/sql-lora/adapter_model.safetensors") == 1
    log = served["server"].log_path.read_text()
    assert "plugin s3_lora_resolver: loaded" in log and "resolver chain, in order: s3_resolver" in log


def test_name_missing_from_the_bucket_is_404(served):
    with pytest.raises(openai.NotFoundError, match="no-such-lora"):
        complete(served, "no-such-lora")


def test_plugins_report_shows_the_vllm_group(served):
    proc = subprocess.run([sys.executable, "-m", "loraplex.server.cli", "plugins", "--json"],
                          env=served["env"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    plugin = {p["name"]: p for p in report["plugins"]}["s3_lora_resolver"]
    assert plugin["group"] == "vllm.general_plugins" and plugin["loaded"]
    assert plugin["distribution"] == "vllm-s3-lora-resolver" and plugin["resolvers"] == ["s3_resolver"]
    assert report["chain"] == [{"resolver": "s3_resolver", "plugin": "s3_lora_resolver"}]
