"""docs/server.md covers every flag, endpoint, environment variable and metric of the server,
checked mechanically against the argparse parser, the app's routes, the code's *_ENV names
and the metric families a running server exports."""

from __future__ import annotations

import re
from pathlib import Path
from types import SimpleNamespace

import torch

from loraplex.core.block_manager import BlockManager
from loraplex.core.engine_loop import core_stats
from loraplex.core.llm_engine import EngineStats
from loraplex.core.lora.manager import LoRAManager
from loraplex.server.app import build_app
from loraplex.server.backend import ServingBackend
from loraplex.server.cli import build_parser
from loraplex.server.demo_mode import demo_environment
from loraplex.server.metrics import ServerMetrics
from loraplex.server.state import ServerState
from server.fake_engine import FakeEngine

REPO = Path(__file__).resolve().parents[2]
DOC = (REPO / "docs" / "server.md").read_text()
# FastAPI's own pages, documented in one line of the Endpoints section.
FASTAPI_ROUTES = {"/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json"}


def section(title: str) -> str:
    return DOC.split(f"\n## {title}\n", 1)[1].split("\n## ", 1)[0]


def table_names(text: str) -> set[str]:
    """Every `name` in the first column of the markdown tables of `text`."""
    names = set()
    for cell in re.findall(r"^\| ([^|]+) \|", text, flags=re.MULTILINE):
        names.update(re.findall(r"`([^`]+)`", cell))
    return names


def serve_parser():
    parser = build_parser()
    subcommands = next(a for a in parser._actions if a.dest == "command")
    return subcommands.choices["serve"]


def test_every_flag_is_in_the_flags_table():
    flags = {opt for action in serve_parser()._actions for opt in action.option_strings
             if opt.startswith("--") and opt != "--help"}
    documented = {name.split()[0] for name in table_names(section("Flags"))}
    assert len(flags) > 20
    assert flags - documented == set(), "docs/server.md's Flags table lacks these"
    assert {n for n in documented if n.startswith("--")} - flags == set(), "documented but gone"


def fake_state(*, runtime_updating: bool) -> ServerState:
    engine = FakeEngine()
    backend = ServingBackend(engine, served_model_names=["base"], model_path="/m",
                             allow_runtime_lora_updating=runtime_updating)
    return ServerState(backend, allow_runtime_lora_updating=runtime_updating)


def test_every_route_is_documented():
    app = build_app(fake_state(runtime_updating=True))
    routes = {(method, route.path) for route in app.routes if route.path not in FASTAPI_ROUTES
              for method in getattr(route, "methods", ()) if method != "HEAD"}
    assert ("POST", "/v1/load_lora_adapter") in routes and ("GET", "/metrics") in routes
    endpoints = section("Endpoints")
    missing = {f"{m} {p}" for m, p in routes if f"`{m} {p}`" not in endpoints}
    assert not missing, f"docs/server.md's Endpoints section lacks {sorted(missing)}"
    for path in ("/docs", "/openapi.json"):
        assert f"`GET {path}`" in endpoints


def env_vars_in_code() -> set[str]:
    """The variables the server, the plugin loader and the shipped resolvers read."""
    names = set(demo_environment())
    for folder in ("server", "resolvers", "plugins"):
        for path in (REPO / "src" / "loraplex" / folder).glob("*.py"):
            names.update(re.findall(r'^\w+_ENV\s*=\s*"([A-Z0-9_]+)"', path.read_text(), flags=re.MULTILINE))
    return names


def test_every_environment_variable_is_documented():
    in_code = env_vars_in_code()
    assert {"VLLM_API_KEY", "VLLM_ALLOW_RUNTIME_LORA_UPDATING", "VLLM_LORA_RESOLVER_S3_URI"} <= in_code
    variables = section("Environment variables")
    # The server's own variables have a row; resolver settings may point to resolvers.md.
    rows = table_names(variables)
    assert {"VLLM_API_KEY", "VLLM_ALLOW_RUNTIME_LORA_UPDATING", "VLLM_PLUGINS",
            "LORAPLEX_ALLOW_PICKLE_LORA_WEIGHTS"} <= rows
    resolvers_doc = (REPO / "docs" / "resolvers.md").read_text()
    missing = {v for v in in_code if v not in rows and not (v in resolvers_doc and "resolvers.md" in variables)}
    assert not missing, f"docs/server.md's variables lack {sorted(missing)}"


def exported_metric_names() -> set[str]:
    """Metric names (without the loraplex_ prefix) of a server whose engine has LoRA on."""
    manager = LoRAManager(SimpleNamespace(max_loras=1, max_lora_rank=8, dtype=torch.float32,
                                          device=torch.device("cpu")), max_cpu_loras=1)
    core = SimpleNamespace(get_stats=lambda: EngineStats(0, 0, 8, 8, 0.0, 0), lora_manager=manager,
                           block_manager=BlockManager(8, 16, enable_prefix_caching=True),
                           config=SimpleNamespace(max_loras=1), scheduler=SimpleNamespace(running=[], waiting=[]))
    backend = ServingBackend(SimpleNamespace(engine_stats=lambda: core_stats(core)),
                             served_model_names=["base"], model_path="/m")
    metrics = ServerMetrics()
    metrics.attach_backend(backend)
    try:
        families = list(metrics.registry.collect())
    finally:
        metrics.detach()
    return {f.name.removeprefix("loraplex_") + ("_total" if f.type == "counter" else "") for f in families}


def test_every_metric_is_in_the_metrics_table():
    exported = exported_metric_names()
    assert {"lora_cpu_evictions_total", "kv_cache_usage_perc", "time_to_first_token_seconds"} <= exported
    documented = table_names(section("Metrics"))
    assert exported - documented == set(), "docs/server.md's Metrics table lacks these"
    assert documented - exported == set(), "documented but not exported"


def test_every_bench_serve_flag_is_documented():
    parser = build_parser()
    bench = next(a for a in parser._actions if a.dest == "command").choices["bench"]
    serve = next(a for a in bench._actions if a.dest == "bench").choices["serve"]
    flags = {opt for action in serve._actions for opt in action.option_strings
             if opt.startswith("--") and opt != "--help"}
    documented = {name.split()[0] for name in table_names(section("Benchmarking: `loraplex bench serve`"))}
    assert len(flags) > 15
    assert flags - documented == set(), "docs/server.md's bench serve table lacks these"
    assert {n for n in documented if n.startswith("--")} - flags == set(), "documented but gone"


def test_every_request_field_is_in_the_request_fields_tables():
    """Each field of the request models is in exactly the table of its kind: implemented, accepted
    without effect (ACCEPTED_WITHOUT_EFFECT) or refused unless off (UNSUPPORTED)."""
    from loraplex.server.protocol import (
        ACCEPTED_WITHOUT_EFFECT, UNSUPPORTED, ChatCompletionRequest, CompletionRequest)
    text = section("Request fields").split("\n### ", 1)[0]
    implemented_part, rest = text.split("\nAccepted without effect:\n")
    accepted_part, refused_part = rest.split("\nRefused unless off:\n")
    fields = set(CompletionRequest.model_fields) | set(ChatCompletionRequest.model_fields)
    assert len(fields) > 70
    assert table_names(refused_part) == set(UNSUPPORTED)
    assert table_names(accepted_part) == set(ACCEPTED_WITHOUT_EFFECT)
    assert table_names(implemented_part) == fields - set(UNSUPPORTED) - set(ACCEPTED_WITHOUT_EFFECT)


def test_every_vllm_request_field_is_implemented_or_answered():
    """Each field of vLLM 0.34's CompletionRequest / ChatCompletionRequest (names in
    vllm_request_fields.json) is loraplex's own, accepted without effect, or refused unless off:
    none is silently ignored."""
    import json
    from pathlib import Path

    from loraplex.server.protocol import (
        ACCEPTED_WITHOUT_EFFECT, UNSUPPORTED, ChatCompletionRequest, CompletionRequest)
    vllm = json.loads((Path(__file__).parent / "vllm_request_fields.json").read_text())
    for kind, ours in (("completion", CompletionRequest), ("chat", ChatCompletionRequest)):
        assert len(vllm[kind]) > 50
        assert set(vllm[kind]) - set(ours.model_fields) - set(UNSUPPORTED) - set(ACCEPTED_WITHOUT_EFFECT) == set()
