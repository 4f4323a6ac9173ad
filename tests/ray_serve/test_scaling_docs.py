"""docs/scaling.md and the KubeRay example say what the code does: every serve-ray flag, the
replicas' own metric families, and a manifest whose application args are valid flags."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from ray import serve

from loraplex.ray.application import app_builder, flags_to_argv
from loraplex.server.cli import build_parser
from loraplex.server.metrics import PREFIX

REPO = Path(__file__).resolve().parents[2]
DOC = (REPO / "docs" / "scaling.md").read_text()
MANIFEST = REPO / "examples" / "kuberay" / "loraplex-rayservice.yaml"


def subcommand_flags(name: str) -> set[str]:
    subcommands = next(a for a in build_parser()._actions if a.dest == "command")
    return {opt for action in subcommands.choices[name]._actions for opt in action.option_strings
            if opt.startswith("--") and opt != "--help"}


def test_every_ray_flag_is_in_the_flags_table():
    ray_flags = subcommand_flags("serve-ray") - subcommand_flags("serve")
    table = DOC.split("\n## Flags\n", 1)[1].split("\n## ", 1)[0]
    documented = {cell.split()[0] for cell in re.findall(r"^\| `([^`]+)`", table, flags=re.MULTILINE)}
    assert len(ray_flags) >= 10
    assert ray_flags - documented == set(), "docs/scaling.md's Flags table lacks these"
    assert documented - ray_flags == set(), "documented but gone"


def test_the_replica_metric_families_are_documented():
    source = (REPO / "src" / "loraplex" / "ray").glob("*.py")
    families = set()
    for path in source:
        text = path.read_text()
        families.update(re.findall(r'Counter\("loraplex_(\w+)"', text))
        families.update(re.findall(r'PREFIX \+ "(\w+)"', text))
    assert {"replica_requests", "replica_info"} <= families
    for family in families:
        name = family + ("_total" if family.endswith("requests") else "")
        assert f"`{name}`" in DOC, f"docs/scaling.md's Metrics table lacks {PREFIX}{name}"


def test_the_kuberay_example_deploys_valid_flags():
    service, config_map = yaml.safe_load_all(MANIFEST.read_text())
    assert service["kind"] == "RayService" and config_map["kind"] == "ConfigMap"
    application = yaml.safe_load(service["spec"]["serveConfigV2"])["applications"][0]
    assert application["import_path"] == "loraplex.ray.application:app_builder"
    args = build_parser().parse_args(["serve-ray", *flags_to_argv(application["args"])])
    assert args.enable_lora and args.ray_replica_gpus == 1 and args.ray_max_replicas == 8
    assert application["import_path"] in DOC and MANIFEST.name in DOC


def test_app_builder_builds_the_application_from_flags_by_name(monkeypatch):
    from loraplex.demo import demo_model_path
    from loraplex.errors import ConfigError

    monkeypatch.delenv("VLLM_API_KEY", raising=False)
    app = app_builder({"model": str(demo_model_path()), "enable-lora": True, "max-loras": 2,
                       "device": "cpu", "replicas": 2, "lora-modules": [{"name": "a", "path": "/a"}]})
    assert isinstance(app, serve.Application)
    with pytest.raises(ConfigError, match="invalid serve-ray flags"):
        app_builder({"model": "/m", "no-such-flag": 1})
