"""`loraplex serve`: flags, start-up (engine, plugins, resolver chain), logs, and uvicorn.

SIGTERM / SIGINT drain: the server stops accepting connections, answers new
generation requests on open connections with 503, lets in-flight requests
finish (up to --graceful-shutdown-timeout seconds), then stops the engine.
"""

from __future__ import annotations

import argparse
import json
import logging
import os

from loraplex.errors import ConfigError

logger = logging.getLogger("loraplex.server")

RUNTIME_LORA_ENV = "VLLM_ALLOW_RUNTIME_LORA_UPDATING"
API_KEY_ENV = "VLLM_API_KEY"


def parse_lora_module(text: str) -> tuple[str, str, str | None]:
    """One --lora-modules item: 'name=path' or a JSON object {"name", "path", "base_model_name"}."""
    if text.lstrip().startswith("{"):
        try:
            spec = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"--lora-modules item {text!r} is not valid JSON ({e}); use "
                              f"'name=path' or '{{\"name\": ..., \"path\": ...}}'") from None
        unknown = set(spec) - {"name", "path", "base_model_name"} if isinstance(spec, dict) else set()
        if not isinstance(spec, dict) or unknown or not isinstance(spec.get("name"), str) \
                or not isinstance(spec.get("path"), str):
            raise ConfigError(f"--lora-modules JSON item {text!r} needs string keys 'name' and 'path' "
                              f"(and optionally 'base_model_name'), nothing else")
        base = spec.get("base_model_name")
        if base is not None and not isinstance(base, str):
            raise ConfigError(f"--lora-modules item {text!r}: base_model_name must be a string")
        return spec["name"], spec["path"], base
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise ConfigError(f"--lora-modules item {text!r} must be 'name=path' or a JSON object "
                          f"with 'name' and 'path'")
    return name, path, None


def check_static_adapter_files(modules: list[tuple[str, str, str | None]], *, allow_pickle: bool) -> None:
    """Refuse a --lora-modules directory that is missing or holds no usable adapter files before
    the model loads; rank and base-model checks follow when the engine loads the adapter."""
    from loraplex.errors import AdapterInvalidError
    from loraplex.resolvers.validation import validate_adapter_dir

    for name, path, _ in modules:
        try:
            validate_adapter_dir(path, allow_pickle=allow_pickle)
        except AdapterInvalidError as e:
            raise ConfigError(f"--lora-modules {name}={path}: {e}; fix the path or drop the module") from None


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", nargs="?", default=None,
                        help="path of the base model checkpoint directory (omit with --demo)")
    parser.add_argument("--demo", action="store_true",
                        help="serve the small demo model and adapters shipped with loraplex "
                             "(adapters resolved on first request from the package's directory)")
    srv = parser.add_argument_group("server")
    srv.add_argument("--host", default=None, help="address to listen on (default: all interfaces; "
                     "127.0.0.1 with --demo, which turns runtime adapter loading on)")
    srv.add_argument("--port", type=int, default=8000, help="TCP port (default: 8000)")
    srv.add_argument("--served-model-name", nargs="+", default=None, metavar="NAME",
                     help="name(s) clients use for the base model; the first one is reported "
                          "(default: the model path as given)")
    srv.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on every "
                     f"/v1 route (default: ${API_KEY_ENV}; no key: no check)")
    srv.add_argument("--graceful-shutdown-timeout", type=float, default=30.0, metavar="SECONDS",
                     help="on SIGTERM, how long in-flight requests may take to finish (default: 30)")
    srv.add_argument("--max-adapter-metric-labels", type=int, default=32, metavar="N",
                     help="adapters with their own label in per-adapter metrics; later ones are "
                          "counted as 'other' (default: 32)")
    srv.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    eng = parser.add_argument_group("engine")
    eng.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"])
    eng.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    eng.add_argument("--max-model-len", type=int, default=None,
                     help="context length (default: the model's max_position_embeddings)")
    eng.add_argument("--gpu-memory-utilization", type=float, default=0.9,
                     help="fraction of GPU memory the engine may use (default: 0.9)")
    eng.add_argument("--kv-cache-bytes", type=int, default=None,
                     help="explicit KV-cache budget in bytes (the CPU path's budget)")
    eng.add_argument("--max-num-seqs", type=int, default=256, help="max sequences per batch (default: 256)")
    eng.add_argument("--block-size", type=int, default=16, help="tokens per KV-cache block (default: 16)")
    eng.add_argument("--seed", type=int, default=0, help="engine random seed (default: 0)")
    eng.add_argument("--enforce-eager", action="store_true", help="never use CUDA graphs")
    eng.add_argument("--tensor-parallel-size", "-tp", type=int, default=1, metavar="N",
                     help="split the model over N GPUs of this host (N CPU processes without a GPU) (default: 1)")
    lora = parser.add_argument_group("LoRA")
    lora.add_argument("--enable-lora", action="store_true", help="serve LoRA adapters")
    lora.add_argument("--lora-modules", nargs="+", default=[], metavar="MODULE",
                      help="adapters loaded at start-up: 'name=path' or a JSON object "
                           "'{\"name\": ..., \"path\": ..., \"base_model_name\": ...}'")
    lora.add_argument("--max-loras", type=int, default=4, help="adapters on the device at once (default: 4)")
    lora.add_argument("--max-lora-rank", type=int, default=16, help="largest adapter rank (default: 16)")
    lora.add_argument("--max-cpu-loras", type=int, default=None,
                      help="adapters kept in CPU memory (default: --max-loras)")
    lora.add_argument("--allow-pickle-lora-weights", action="store_true",
                      help="accept adapters whose only weights are adapter_model.bin (pickle can run code)")


def engine_config_from_args(args: argparse.Namespace):
    from loraplex.core.config import EngineConfig

    return EngineConfig(
        model=args.model, dtype=args.dtype, device=args.device, seed=args.seed, block_size=args.block_size,
        gpu_memory_utilization=args.gpu_memory_utilization, kv_cache_bytes=args.kv_cache_bytes,
        max_model_len=args.max_model_len, max_num_seqs=args.max_num_seqs, enforce_eager=args.enforce_eager,
        tensor_parallel_size=args.tensor_parallel_size, enable_lora=args.enable_lora, max_loras=args.max_loras, max_lora_rank=args.max_lora_rank,
        max_cpu_loras=args.max_cpu_loras, allow_pickle_lora_weights=args.allow_pickle_lora_weights)


def build_state(args: argparse.Namespace, engine=None):
    """Everything `serve` runs, without the network: engine, plugins, chain, backend.

    `engine` (an AsyncEngine) may be passed in; otherwise one is built from the args.
    """
    from loraplex.plugins.loader import load_plugins
    from loraplex.resolvers.chain import ResolverChain
    from loraplex.resolvers.env import ALLOW_PICKLE_ENV, env_flag
    from loraplex.server.backend import ServingBackend
    from loraplex.server.demo_mode import apply_demo_args
    from loraplex.server.metrics import ServerMetrics
    from loraplex.server.state import ServerState

    apply_demo_args(args)
    modules = [parse_lora_module(m) for m in args.lora_modules]
    if modules and not args.enable_lora:
        raise ConfigError("--lora-modules needs --enable-lora")
    check_static_adapter_files(modules, allow_pickle=args.allow_pickle_lora_weights)
    if args.max_adapter_metric_labels < 0:
        raise ConfigError("--max-adapter-metric-labels must be >= 0")
    allow_runtime = env_flag(RUNTIME_LORA_ENV, default=False)
    if args.allow_pickle_lora_weights:
        # Resolvers read the opt-in from the environment; the flag opts them in too.
        os.environ[ALLOW_PICKLE_ENV] = "1"
    config = engine_config_from_args(args)
    if engine is None:
        from loraplex.core.async_engine import AsyncEngine
        engine = AsyncEngine.from_config(config)
    records = load_plugins()
    chain = ResolverChain.from_registry() if args.enable_lora else None
    names = args.served_model_name or [args.model]
    lora_runtime = getattr(getattr(getattr(engine, "engine", None), "runner", None), "lora", None)
    if lora_runtime is not None:   # adapters may name the base model by a served name
        lora_runtime.manager.add_served_names(names)
    backend = ServingBackend(engine, served_model_names=names, model_path=args.model, resolver_chain=chain,
                             allow_runtime_lora_updating=allow_runtime, enable_lora=args.enable_lora,
                             max_model_len=getattr(getattr(engine, "engine", engine), "max_model_len", None))
    backend.static_adapters.extend(modules)
    api_key = args.api_key if args.api_key is not None else os.environ.get(API_KEY_ENV) or None
    state = ServerState(backend, metrics=ServerMetrics(max_adapter_labels=args.max_adapter_metric_labels),
                        api_key=api_key, allow_runtime_lora_updating=allow_runtime and args.enable_lora)
    log_startup(args, config, engine, records, chain, allow_runtime, [m[0] for m in modules])
    return state


def log_startup(args, config, engine, records, chain, allow_runtime: bool, static_names: list[str]) -> None:
    core = getattr(engine, "engine", engine)
    runner = getattr(core, "runner", None)
    block_manager = getattr(core, "block_manager", None)
    logger.info("serving model %s as %s", args.model, ", ".join(args.served_model_name or [args.model]))
    logger.info("dtype %s, device %s, max_model_len %s", getattr(runner, "dtype", config.dtype),
                getattr(core, "device", config.device), getattr(core, "max_model_len", config.max_model_len))
    if block_manager is not None:
        logger.info("KV cache: %d blocks of %d tokens", block_manager.num_blocks, block_manager.block_size)
    if config.enable_lora:
        logger.info("LoRA: max_loras %d, max_lora_rank %d, max_cpu_loras %d, static adapters: %s",
                    config.max_loras, config.max_lora_rank, config.max_cpu_loras,
                    ", ".join(static_names) or "none")
    else:
        logger.info("LoRA: disabled (start with --enable-lora to serve adapters)")
    for record in records:
        status = "loaded" if record.loaded else (record.error or record.skip_reason or "not loaded")
        logger.info("plugin %s: %s", record.name, status)
    if chain is not None:
        order = ", ".join(chain.resolver_names) or "none"
        state = "on" if allow_runtime else f"off (set {RUNTIME_LORA_ENV}=True to resolve on first request)"
        logger.info("resolver chain, in order: %s; resolution on first request: %s", order, state)


def run_server(args: argparse.Namespace) -> int:
    import uvicorn

    from loraplex.server.app import build_app

    state = build_state(args)
    app = build_app(state)

    class DrainingServer(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:
            if not state.is_draining:
                logger.info("signal %s: draining in-flight requests, then exiting", sig)
            state.is_draining = True
            super().handle_exit(sig, frame)
            # uvicorn re-raises captured signals once it has stopped, which would end the
            # process "killed by SIGTERM"; after a completed drain the exit status is 0.
            captured = getattr(self, "_captured_signals", None)
            if isinstance(captured, list):
                captured.clear()

    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                            timeout_graceful_shutdown=args.graceful_shutdown_timeout)
    logger.info("listening on http://%s:%d (OpenAI API under /v1)", args.host, args.port)
    DrainingServer(config).run()
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    logging.getLogger("loraplex").setLevel(args.log_level.upper())
    try:
        return run_server(args)
    except ConfigError as e:
        logger.error("%s", e)
        return 2
