"""LoRAIngress: the OpenAI-compatible HTTP front of the replicas, as a Ray Serve ingress.

It serves the FastAPI app of `loraplex serve` (server/app.build_app: the same
routes, errors, streaming, API key and metrics), built over a RayBackend instead of
a local engine. Ray Serve's HTTP proxy hands it every request; the app is built per
ingress replica, after the constructor, through Serve's late-bound ASGI hook.
"""

from __future__ import annotations

from ray import serve

from loraplex.core.gc_heap import freeze_startup_heap
from loraplex.core.tokenizer import load_tokenizer
from loraplex.ray.backend import RayBackend
from loraplex.ray.cluster_metrics import ClusterMetrics
from loraplex.resolvers.env import env_flag
from loraplex.server.app import build_app
from loraplex.server.http_options import http_options_from_args
from loraplex.server.lora_modules import parse_lora_module
from loraplex.server.multimodal import ServerMultimodal
from loraplex.server.serve import (
    RUNTIME_LORA_ENV, SKIP_MODEL_NAME_VALIDATION_ENV, engine_config_from_args, read_chat_template,
    request_defaults_from_args)
from loraplex.server.state import ServerState


def ingress_state(serve_args, replicas, directory, *, route_by_adapter: bool = True) -> ServerState:
    """The ServerState of the ingress: what build_state makes for `loraplex serve`, with a
    RayBackend in place of the engine (serve_args as resolved by the CLI: model, names, key)."""
    allow_runtime = env_flag(RUNTIME_LORA_ENV, default=False)
    tokenizer = load_tokenizer(serve_args.model)
    if getattr(serve_args, "chat_template", None) is not None:
        tokenizer.chat_template = read_chat_template(serve_args.chat_template)
    config = engine_config_from_args(serve_args)
    multimodal = ServerMultimodal.for_ray_ingress(config, tokenizer)
    backend = RayBackend(
        replicas, directory, tokenizer=tokenizer,
        served_model_names=serve_args.served_model_name or [serve_args.model], model_path=serve_args.model,
        # Every replica loads these at its start: --lora-modules, and the default adapter of each
        # modality under the modality's name.
        static_adapter_names=[parse_lora_module(m).name for m in serve_args.lora_modules] + list(
            multimodal.default_loras),
        allow_runtime_lora_updating=allow_runtime, enable_lora=serve_args.enable_lora,
        skip_model_name_validation=env_flag(SKIP_MODEL_NAME_VALIDATION_ENV, default=False),
        route_by_adapter=route_by_adapter)
    return ServerState(backend, metrics=ClusterMetrics(max_adapter_labels=serve_args.max_adapter_metric_labels),
                       api_key=serve_args.api_key,
                       allow_runtime_lora_updating=allow_runtime and serve_args.enable_lora, multimodal=multimodal,
                       request_defaults=request_defaults_from_args(serve_args, config),
                       http=http_options_from_args(serve_args),
                       response_role=getattr(serve_args, "response_role", "assistant"),
                       return_tokens_as_token_ids=getattr(serve_args, "return_tokens_as_token_ids", False))


@serve.ingress()
class LoRAIngress:
    def __init__(self, serve_args, replicas, directory, route_by_adapter: bool = True) -> None:
        self.state = ingress_state(serve_args, replicas, directory, route_by_adapter=route_by_adapter)
        freeze_startup_heap("Ray ingress")

    def __serve_build_asgi_app__(self):
        return build_app(self.state)
