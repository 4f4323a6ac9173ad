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
from loraplex.server.flag_types import human_int, json_flag, positive_int
from loraplex.server.http_options import (AccessLogFilter, add_http_arguments, bind_listen_sockets,
                                          http_options_from_args, uvicorn_options)
from loraplex.server.lora_modules import local_adapter_dirs, parse_lora_module
from loraplex.server.vllm_flags import add_vllm_flags, check_vllm_flags

logger = logging.getLogger("loraplex.server")

RUNTIME_LORA_ENV = "VLLM_ALLOW_RUNTIME_LORA_UPDATING"
API_KEY_ENV = "VLLM_API_KEY"
SKIP_MODEL_NAME_VALIDATION_ENV = "VLLM_SKIP_MODEL_NAME_VALIDATION"
DEFAULT_MAX_LORAS = 1   # vLLM's
DEMO_MAX_LORAS = 4      # --demo's: room for every shipped adapter in one batch
# The ranks vLLM's --max-lora-rank accepts; loraplex takes any rank >= 1 and says so.
VLLM_MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", nargs="?", default=None,
                        help="path of the base model checkpoint directory (omit with --demo)")
    parser.add_argument("--config", metavar="FILE",
                        help="read flags from a YAML file of long flag names and values, and `model` "
                             "(vLLM's); flags on the command line win")
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
    srv.add_argument("--hf-token", nargs="?", const=True, default=None, metavar="TOKEN",
                     help="the Hugging Face token the Hub resolver downloads adapters with (vLLM's; default: "
                          "$HF_TOKEN, else the one `hf auth login` stored)")
    srv.add_argument("--graceful-shutdown-timeout", type=float, default=30.0, metavar="SECONDS",
                     help="on SIGTERM, how long in-flight requests may take to finish (default: 30)")
    srv.add_argument("--max-adapter-metric-labels", type=int, default=32, metavar="N",
                     help="adapters with their own label in per-adapter metrics; later ones are "
                          "counted as 'other' (default: 32)")
    srv.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    srv.add_argument("--stream-interval", type=positive_int, default=1, metavar="N",
                     help="stream a request's tokens N at a time (the first and the last at once): "
                          "fewer, larger chunks cost the server less per token; a request's own "
                          "stream_interval may only raise it (default: 1)")
    srv.add_argument("--return-tokens-as-token-ids", action=argparse.BooleanOptionalAction, default=False,
                     help="logprobs name tokens 'token_id:{id}' (any token can be named so, even one that is not valid UTF-8 alone); a request's return_tokens_as_token_ids overrides it (vLLM's; default: off)")
    srv.add_argument("--response-role", default="assistant", metavar="ROLE",
                     help="the role of chat completions' answers after a generation prompt (default: assistant)")
    srv.add_argument("--chat-template", default=None, metavar="FILE_OR_TEMPLATE",
                     help="the chat template of /v1/chat/completions and /tokenize, a Jinja file or the template "
                          "itself (default: the tokenizer's, from MODEL's directory)")
    eng = parser.add_argument_group("engine")
    eng.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"])
    eng.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    eng.add_argument("--max-model-len", type=human_int, default=None,
                     help="context length (default: the model's max_position_embeddings)")
    eng.add_argument("--gpu-memory-utilization", "--device-memory-utilization", type=float, default=0.9,
                     help="fraction of GPU memory the engine may use (default: 0.9)")
    eng.add_argument("--kv-cache-bytes", "--kv-cache-memory-bytes", type=human_int, default=None,
                     help="explicit KV-cache budget in bytes, instead of --gpu-memory-utilization's share "
                          "(the CPU path's budget; vLLM's --kv-cache-memory-bytes)")
    eng.add_argument("--max-num-seqs", type=int, default=256, help="max sequences per batch (default: 256)")
    eng.add_argument("--block-size", type=int, default=16, help="tokens per KV-cache block (default: 16)")
    eng.add_argument("--seed", type=int, default=0, help="engine random seed (default: 0)")
    eng.add_argument("--max-num-batched-tokens", type=human_int, default=8192,
                     help="most tokens computed in one step, prompt chunks and decodes (default: 8192)")
    eng.add_argument("--long-prefill-token-threshold", type=int, default=0, metavar="N",
                     help="most tokens one prompt computes in a step (vLLM's; default 0: up to the step's "
                          "budget): a long prompt then shares steps with the decodes in smaller chunks")
    eng.add_argument("--enforce-eager", action="store_true", help="never use CUDA graphs")
    eng.add_argument("--load-format", default="auto", choices=["auto", "dummy"],
                     help="dummy: random weights from MODEL's config.json, no checkpoint read "
                          "(benchmarks at real shapes; the output is noise) (default: auto)")
    eng.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=False,
                     help="share the computed keys and values of prompt prefixes between requests "
                          "(default: off; the outputs are the same)")
    eng.add_argument("--disable-prefix-caching", dest="enable_prefix_caching", action="store_false",
                     help="vLLM's spelling of --no-enable-prefix-caching")
    eng.add_argument("--generation-config", default="auto", metavar="auto|vllm|DIR",
                     help="default sampling parameters of requests that leave them unset: 'auto' those the "
                          "model's generation_config.json recommends (temperature, top_p, top_k, min_p, "
                          "repetition_penalty; max_new_tokens caps max_tokens), 'vllm' none, or a directory "
                          "holding a generation_config.json (default: auto, as vLLM)")
    eng.add_argument("--override-generation-config", type=json_flag("--override-generation-config", '{"temperature": 0.5}'),
                     default=None, metavar="JSON",
                     help="default sampling parameters on top of --generation-config's, e.g. "
                          "'{\"temperature\": 0.5}'")
    eng.add_argument("--max-logprobs", type=int, default=20, metavar="N",
                     help="the most top tokens per position a request's logprobs / top_logprobs / "
                          "prompt_logprobs may ask for; -1: the whole vocabulary (default: 20, as vLLM)")
    eng.add_argument("--async-scheduling", action=argparse.BooleanOptionalAction, default=True,
                     help="overlap the host's work on one step with the device's on the next "
                          "(default: on; --no-async-scheduling runs them in lock step)")
    eng.add_argument("--disable-frontend-multiprocessing", action="store_true",
                     help="run the engine's step loop in a thread of the API server's process "
                          "instead of its own process (slower under load; for debugging)")
    eng.add_argument("--tensor-parallel-size", "-tp", type=int, default=1, metavar="N",
                     help="split the model over N GPUs of this host (N CPU processes without a GPU) (default: 1)")
    lora = parser.add_argument_group("LoRA")
    lora.add_argument("--enable-lora", action="store_true", help="serve LoRA adapters")
    lora.add_argument("--lora-modules", nargs="+", default=[], metavar="MODULE",
                      help="adapters loaded at start-up: 'name=path' or a JSON object '{\"name\": ..., "
                           "\"path\": ..., \"base_model_name\": ..., \"is_3d_lora_weight\": ...}'; the path "
                           "may be a Hugging Face Hub repo id (org/repo[@revision]), downloaded at start-up")
    lora.add_argument("--max-loras", type=int, default=None,
                      help=f"adapters on the device at once, i.e. in one batch (default: {DEFAULT_MAX_LORAS}, "
                           f"as in vLLM; {DEMO_MAX_LORAS} with --demo)")
    lora.add_argument("--max-lora-rank", type=int, default=16,
                      help=f"largest adapter rank (default: 16); vLLM accepts "
                           f"{', '.join(map(str, VLLM_MAX_LORA_RANKS))}, loraplex any rank >= 1")
    lora.add_argument("--max-cpu-loras", type=int, default=None,
                      help="adapters kept in CPU memory (default: --max-loras)")
    lora.add_argument("--lora-dtype", default="auto", choices=["auto", "float16", "bfloat16", "float32"],
                      help="dtype of the LoRA weights (default: auto, the model's; another dtype is refused)")
    lora.add_argument("--lora-target-modules", nargs="+", default=None, metavar="MODULE",
                      help="apply LoRA to these layers only (qkv_proj, o_proj, gate_up_proj, down_proj, or "
                           "PEFT names: q_proj means qkv_proj); adapters with weights elsewhere are refused "
                           "(default: every layer)")
    lora.add_argument("--allow-pickle-lora-weights", action="store_true",
                      help="accept adapters whose only weights are adapter_model.bin (pickle can run code)")
    add_multimodal_arguments(parser)
    add_http_arguments(parser)
    add_vllm_flags(parser)
    so = parser.add_argument_group("structured outputs (docs/server.md, \"Structured outputs\")")
    so.add_argument("--structured-outputs-config", type=structured_outputs_config, default={}, metavar="JSON",
                    help="vLLM's structured-outputs settings: backend ('auto' or 'guidance': llguidance), and "
                         "the defaults of requests that do not set them, disable_any_whitespace and "
                         "disable_additional_properties, e.g. '{\"disable_any_whitespace\": true}'")


# --structured-outputs-config: vLLM's StructuredOutputsConfig keys that loraplex reads.
STRUCTURED_OUTPUTS_BACKENDS = ("auto", "guidance")
STRUCTURED_OUTPUTS_OPTIONS = ("disable_any_whitespace", "disable_additional_properties")


def structured_outputs_config(text: str) -> dict[str, bool]:
    """Parse --structured-outputs-config: the request defaults it sets (argparse type)."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"--structured-outputs-config must be a JSON object ({e})") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("--structured-outputs-config must be a JSON object like "
                                         "'{\"disable_any_whitespace\": true}'")
    backend = value.pop("backend", "auto")
    if backend not in STRUCTURED_OUTPUTS_BACKENDS:
        raise argparse.ArgumentTypeError(f"--structured-outputs-config: backend {backend!r} is not available; "
                                         f"loraplex's grammar engine is llguidance ('guidance' or 'auto')")
    if value.pop("reasoning_parser", "") not in ("", None):
        raise argparse.ArgumentTypeError("--structured-outputs-config: there is no reasoning parser")
    unknown = sorted(set(value) - set(STRUCTURED_OUTPUTS_OPTIONS))
    if unknown:
        raise argparse.ArgumentTypeError(f"--structured-outputs-config: unknown key(s) {unknown}; it takes backend, "
                                         f"{', '.join(STRUCTURED_OUTPUTS_OPTIONS)}")
    if not all(isinstance(v, bool) for v in value.values()):
        raise argparse.ArgumentTypeError("--structured-outputs-config: options must be true or false")
    return value


def add_multimodal_arguments(parser: argparse.ArgumentParser) -> None:
    mm = parser.add_argument_group("multimodal (docs/multimodal.md)")
    mm.add_argument("--limit-mm-per-prompt", type=json_flag("--limit-mm-per-prompt", '{"image": 2}'), default=None,
                    metavar="JSON", help="most items per prompt, per modality, e.g. '{\"image\": 2}' "
                                         "(default: no cap but max_model_len)")
    mm.add_argument("--default-mm-loras", type=json_flag("--default-mm-loras", '{"image": 2}'), default=None, metavar="JSON",
                    help="a LoRA applied to chat requests with that modality unless they name an adapter, "
                         "e.g. '{\"audio\": \"/path/to/lora\"}' (a path, or a name a resolver finds); "
                         "needs --enable-lora")
    mm.add_argument("--allow-remote-media", action="store_true",
                    help="fetch http(s) image/audio URLs in chat messages (default: data: URLs only)")
    mm.add_argument("--allowed-media-domains", nargs="+", default=None, metavar="HOST",
                    help="with --allow-remote-media: fetch only from these hosts")
    mm.add_argument("--media-fetch-timeout", type=float, default=5.0, metavar="SECONDS",
                    help="time allowed for one remote media download (default: 5)")
    mm.add_argument("--max-media-bytes", type=int, default=25 * 2**20, metavar="BYTES",
                    help="largest image or audio file accepted (default: 25 MiB)")


def engine_config_from_args(args: argparse.Namespace):
    from loraplex.core.config import EngineConfig

    return EngineConfig(
        model=args.model, dtype=args.dtype, device=args.device, seed=args.seed, block_size=args.block_size,
        gpu_memory_utilization=args.gpu_memory_utilization, kv_cache_bytes=args.kv_cache_bytes,
        max_model_len=args.max_model_len, max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens, enforce_eager=args.enforce_eager,
        long_prefill_token_threshold=args.long_prefill_token_threshold,
        load_format=args.load_format, async_scheduling=args.async_scheduling,
        enable_prefix_caching=args.enable_prefix_caching,
        generation_config=args.generation_config, override_generation_config=args.override_generation_config,
        max_logprobs=args.max_logprobs,
        tensor_parallel_size=args.tensor_parallel_size,
        enable_lora=args.enable_lora, max_lora_rank=args.max_lora_rank,
        max_loras=DEFAULT_MAX_LORAS if args.max_loras is None else args.max_loras,
        max_cpu_loras=args.max_cpu_loras, allow_pickle_lora_weights=args.allow_pickle_lora_weights,
        lora_dtype=args.lora_dtype,
        lora_target_modules=tuple(args.lora_target_modules) if args.lora_target_modules else None,
        limit_mm_per_prompt=args.limit_mm_per_prompt, default_mm_loras=args.default_mm_loras,
        allow_remote_media=args.allow_remote_media, allowed_media_domains=args.allowed_media_domains,
        media_fetch_timeout=args.media_fetch_timeout, max_media_bytes=args.max_media_bytes)


def request_defaults_from_args(args: argparse.Namespace, config):
    """What requests leave unset, from the flags (the model's generation config read once)."""
    from loraplex.core.generation_defaults import generation_defaults
    from loraplex.server.sampling import RequestDefaults

    return RequestDefaults(
        sampling=generation_defaults(config.model, config.generation_config, config.override_generation_config),
        structured_outputs=dict(getattr(args, "structured_outputs_config", None) or {}),
        stream_interval=getattr(args, "stream_interval", 1))


def read_chat_template(value: str | None) -> str | None:
    """--chat-template: a file's contents, or the value itself when it is a template (as vLLM reads it)."""
    if value is None:
        return None
    if os.path.isfile(value):
        with open(value, encoding="utf-8") as f:
            template = f.read()
    elif any(c in value for c in "{}\n"):
        template = value
    else:
        raise ConfigError(f"--chat-template {value!r} is neither a file nor a template (a template holds "
                          f"Jinja tags such as {{{{ ... }}}}); give the path of a .jinja file")
    import jinja2
    try:
        jinja2.Environment().parse(template)
    except jinja2.TemplateSyntaxError as e:
        raise ConfigError(f"--chat-template is not a valid Jinja template: {e} (line {e.lineno})") from None
    return template


def build_state(args: argparse.Namespace, engine=None, before_engine=None):
    """Everything `serve` runs, without the network: engine, plugins, chain, backend.

    `engine` (an AsyncEngine) may be passed in; otherwise one is built from the args: its
    step loop in an engine process of its own, or, with --disable-frontend-multiprocessing,
    in a thread of this process, after `before_engine()` (run_server takes its port there:
    once the flags are checked, before the model loads).
    """
    from loraplex.plugins.loader import load_plugins
    from loraplex.resolvers.chain import ResolverChain
    from loraplex.resolvers.env import ALLOW_PICKLE_ENV, env_flag
    from loraplex.server.backend import ServingBackend
    from loraplex.server.demo_mode import apply_demo_args
    from loraplex.server.metrics import ServerMetrics
    from loraplex.server.multimodal import ServerMultimodal
    from loraplex.server.state import ServerState

    apply_demo_args(args)
    check_vllm_flags(args)
    chat_template = read_chat_template(args.chat_template)
    modules = [parse_lora_module(m) for m in args.lora_modules]
    if modules and not args.enable_lora:
        raise ConfigError("--lora-modules needs --enable-lora")
    if args.max_lora_rank not in VLLM_MAX_LORA_RANKS:
        logger.warning("--max-lora-rank %d is not one of vLLM's values (%s); loraplex accepts it", args.max_lora_rank,
                       ", ".join(map(str, VLLM_MAX_LORA_RANKS)))
    static_adapters = local_adapter_dirs(modules, allow_pickle=args.allow_pickle_lora_weights)
    if args.max_adapter_metric_labels < 0:
        raise ConfigError("--max-adapter-metric-labels must be >= 0")
    allow_runtime = env_flag(RUNTIME_LORA_ENV, default=False)
    skip_name_validation = env_flag(SKIP_MODEL_NAME_VALIDATION_ENV, default=False)
    if isinstance(args.hf_token, str):
        os.environ["HF_TOKEN"] = args.hf_token     # what huggingface_hub, so the Hub resolver, reads
    if args.allow_pickle_lora_weights:
        # Resolvers read the opt-in from the environment; the flag opts them in too.
        os.environ[ALLOW_PICKLE_ENV] = "1"
    config = engine_config_from_args(args)
    request_defaults = request_defaults_from_args(args, config)   # a bad --generation-config stops us here
    http = http_options_from_args(args)                           # and so does a bad --middleware
    names = args.served_model_name or [args.model]
    if engine is None:
        from loraplex.core.async_engine import AsyncEngine
        if before_engine is not None:
            before_engine()
        # Adapters may name the base model by a served name.
        engine = AsyncEngine.from_config(config, engine_process=not args.disable_frontend_multiprocessing,
                                         served_model_names=names, log_level=args.log_level)
    records = load_plugins()
    chain = ResolverChain.from_registry() if args.enable_lora else None
    backend = ServingBackend(engine, served_model_names=names, model_path=args.model, resolver_chain=chain,
                             allow_runtime_lora_updating=allow_runtime, enable_lora=args.enable_lora,
                             max_model_len=getattr(engine, "max_model_len", None),
                             skip_model_name_validation=skip_name_validation)
    backend.static_adapters.extend(static_adapters)
    if chat_template is not None:
        backend.tokenizer.chat_template = chat_template
    api_key = args.api_key if args.api_key is not None else os.environ.get(API_KEY_ENV) or None
    state = ServerState(backend, metrics=ServerMetrics(max_adapter_labels=args.max_adapter_metric_labels),
                        api_key=api_key, allow_runtime_lora_updating=allow_runtime and args.enable_lora,
                        multimodal=ServerMultimodal.from_engine(engine, config),
                        request_defaults=request_defaults, http=http,
                        response_role=args.response_role, return_tokens_as_token_ids=args.return_tokens_as_token_ids)
    log_startup(args, config, engine, records, chain, allow_runtime, [m.name for m in modules])
    return state


def log_startup(args, config, engine, records, chain, allow_runtime: bool, static_names: list[str]) -> None:
    info = dict(getattr(engine, "info", None) or {})
    logger.info("serving model %s as %s", args.model, ", ".join(args.served_model_name or [args.model]))
    logger.info("dtype %s, device %s, max_model_len %s", info.get("dtype", config.dtype),
                info.get("device", config.device), info.get("max_model_len", config.max_model_len))
    if "num_kv_blocks" in info:
        logger.info("KV cache: %d blocks of %d tokens", info["num_kv_blocks"], info["block_size"])
    pid = getattr(engine, "engine_pid", None)
    logger.info("engine loop: %s; scheduling: %s", f"engine process {pid}" if pid else "a thread of this process",
                "overlapped (async)" if info.get("async_scheduling", config.async_scheduling) else "in lock step")
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

    from loraplex.core.gc_heap import freeze_startup_heap
    from loraplex.server.app import build_app

    options = uvicorn_options(args)              # a bad TLS file stops the start-up before the model loads
    sockets: list = []                           # and so does a port in use (taken once the flags are checked)
    try:
        state = build_state(args, before_engine=lambda: sockets.extend(bind_listen_sockets(options["host"],
                                                                                           options["port"])))
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    app = build_app(state)

    class DrainingServer(uvicorn.Server):
        async def startup(self, sockets=None) -> None:
            await super().startup(sockets)           # after the app's start-up (adapters loaded)
            freeze_startup_heap("API server")

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

    config = uvicorn.Config(app, **options)      # (configures uvicorn's loggers: filters go on after)
    if args.disable_access_log_for_endpoints:
        logging.getLogger("uvicorn.access").addFilter(
            AccessLogFilter(args.disable_access_log_for_endpoints.split(",")))
    logger.info("listening on %s://%s:%d%s (OpenAI API under /v1)", "https" if args.ssl_certfile else "http",
                args.host, sockets[0].getsockname()[1], args.root_path)   # the port --port 0 got
    DrainingServer(config).run(sockets=sockets)
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    logging.getLogger("loraplex").setLevel(args.log_level.upper())
    from loraplex.errors import EngineDeadError
    try:
        return run_server(args)
    except ConfigError as e:
        logger.error("%s", e)
        return 2
    except EngineDeadError as e:     # the engine process died while starting
        logger.error("%s", e)
        return 1
