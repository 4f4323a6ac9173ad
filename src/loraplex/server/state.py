"""ServerState: what every route needs, kept on app.state (one per app, no globals)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from loraplex.server.backend import ServingBackend
from loraplex.server.http_options import HTTPOptions
from loraplex.server.metrics import ServerMetrics
from loraplex.server.sampling import RequestDefaults


@dataclass
class ServerState:
    backend: ServingBackend
    metrics: ServerMetrics = field(default_factory=ServerMetrics)
    api_key: str | None = None
    # /v1/load_lora_adapter and /v1/unload_lora_adapter exist only when this is true
    # (VLLM_ALLOW_RUNTIME_LORA_UPDATING), as does resolution on first request.
    allow_runtime_lora_updating: bool = False
    # Set when SIGTERM/SIGINT starts the drain: new generation requests get 503.
    is_draining: bool = False
    # Generation requests in progress (with --enable-server-load-tracking: GET /load).
    server_load: int = 0
    # Image/audio content parts and default LoRAs per modality (server/multimodal.py); None in
    # tests that build a state by hand.
    multimodal: Any = None
    # What requests leave unset: --generation-config, --structured-outputs-config,
    # --stream-interval (server/sampling.py).
    request_defaults: RequestDefaults = field(default_factory=RequestDefaults)
    http: HTTPOptions = field(default_factory=HTTPOptions)
    response_role: str = "assistant"    # --response-role: the role of chat answers
    # --return-tokens-as-token-ids: logprobs name every token "token_id:{id}" unless the request says otherwise
    return_tokens_as_token_ids: bool = False
