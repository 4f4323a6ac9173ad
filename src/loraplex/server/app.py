"""build_app: the FastAPI application of the OpenAI-compatible server."""

from __future__ import annotations

import logging
from contextlib import asynccontextmanager
from importlib.metadata import PackageNotFoundError, version

# Starlette's responses import anyio's asyncio backend on the first one that runs a task
# group (every streamed response): 25 ms alone, 70 ms of a burst's first requests on an H100
# host. Imported with the app instead, before the server listens.
import anyio._backends._asyncio  # noqa: F401
from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from loraplex.server.chat import create_chat_completion
from loraplex.server.completions import create_completion
from loraplex.server.errors import INVALID_USER_INPUT, HTTPError, install_error_handlers
from loraplex.server.middleware import (
    APIKeyMiddleware, MetricsMiddleware, RequestIdHeaderMiddleware, ServerLoadMiddleware, add_user_middleware)
from loraplex.server.protocol import (
    ChatCompletionRequest, CompletionRequest, DetokenizeRequest, LoadLoRAAdapterRequest, TokenizeChatRequest,
    TokenizeCompletionRequest, UnloadLoRAAdapterRequest)
from loraplex.server.responses_api import ResponsesRequest, create_response, not_stored
from loraplex.server.state import ServerState
from loraplex.server.tokenize import detokenize, tokenize, tokenizer_info

logger = logging.getLogger(__name__)


def loraplex_version() -> str:
    try:
        return version("loraplex")
    except PackageNotFoundError:
        return "unknown"


def _state(request: Request) -> ServerState:
    return request.app.state.loraplex


def _check_not_draining(state: ServerState) -> None:
    if state.is_draining:
        raise HTTPError(503, "the server is shutting down and takes no new requests; retry on "
                             "another replica")


def build_app(state: ServerState) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI):
        try:
            await state.backend.startup()
            if state.multimodal is not None:
                await state.multimodal.startup(state.backend)
            yield
        finally:
            state.metrics.detach()
            await state.backend.shutdown()

    # /docs and /openapi.json describe the API (documented in docs/server.md); FastAPI's
    # second renderer of the same schema, /redoc, is not served.
    docs = state.http.docs                     # --disable-fastapi-docs turns both off
    app = FastAPI(title="loraplex", version=loraplex_version(), lifespan=lifespan, redoc_url=None,
                  docs_url="/docs" if docs else None, openapi_url="/openapi.json" if docs else None,
                  description="OpenAI-compatible multi-LoRA server")
    app.state.loraplex = state
    install_error_handlers(app)

    @app.get("/health")
    async def health(request: Request) -> Response:
        if not _state(request).backend.is_healthy():
            raise HTTPError(503, "the engine has stopped; see the server log and restart it")
        return Response(status_code=200)

    # vLLM's /ping: /health under the name SageMaker's container contract asks for.
    app.add_api_route("/ping", health, methods=["GET", "POST"])

    @app.get("/version")
    async def get_version() -> dict:
        return {"version": loraplex_version()}

    @app.get("/metrics")
    async def metrics(request: Request) -> Response:
        return Response(_state(request).metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def list_models(request: Request) -> dict:
        backend = _state(request).backend
        base = [{"id": name, "object": "model", "created": backend.created, "owned_by": "loraplex",
                 "root": backend.model_path, "parent": None, "max_model_len": backend.max_model_len}
                for name in backend.served_model_names]
        adapters = [{"id": a.lora_name, "object": "model", "created": backend.created,
                     "owned_by": "loraplex", "root": a.lora_path,
                     "parent": backend.parent_of(a.lora_name), "max_model_len": None}
                    for a in backend.list_adapters()]
        return {"object": "list", "data": base + adapters}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        state = _state(request)
        _check_not_draining(state)
        return await create_completion(body, request, state)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        state = _state(request)
        _check_not_draining(state)
        return await create_chat_completion(body, request, state)

    @app.post("/v1/responses")
    async def responses(body: ResponsesRequest, request: Request):
        state = _state(request)
        _check_not_draining(state)
        return await create_response(body, request, state)

    @app.get("/v1/responses/{response_id}")
    @app.delete("/v1/responses/{response_id}")
    @app.post("/v1/responses/{response_id}/cancel")
    async def stored_response(response_id: str):
        raise not_stored(response_id)

    @app.post("/tokenize")
    async def tokenize_route(body: TokenizeCompletionRequest | TokenizeChatRequest, request: Request) -> dict:
        return await tokenize(body, _state(request))

    @app.post("/detokenize")
    async def detokenize_route(body: DetokenizeRequest, request: Request) -> dict:
        return await detokenize(body, _state(request))

    if state.allow_runtime_lora_updating:
        logger.warning("runtime LoRA updating is on (VLLM_ALLOW_RUNTIME_LORA_UPDATING): "
                       "/v1/load_lora_adapter and /v1/unload_lora_adapter are enabled")

        @app.post("/v1/load_lora_adapter", response_class=PlainTextResponse)
        async def load_lora_adapter(body: LoadLoRAAdapterRequest, request: Request):
            if not body.lora_name or not body.lora_path:
                raise HTTPError(400, "Both 'lora_name' and 'lora_path' must be provided.",
                                param="lora_name" if not body.lora_name else "lora_path",
                                error_type=INVALID_USER_INPUT)
            await _state(request).backend.load_adapter(
                body.lora_name, body.lora_path, base_model_name=body.base_model_name,
                load_inplace=body.load_inplace)
            return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' added successfully.")

        @app.post("/v1/unload_lora_adapter", response_class=PlainTextResponse)
        async def unload_lora_adapter(body: UnloadLoRAAdapterRequest, request: Request):
            if not body.lora_name:
                raise HTTPError(400, "'lora_name' needs to be provided to unload a LoRA adapter.",
                                param="lora_name", error_type=INVALID_USER_INPUT)
            await _state(request).backend.unload_adapter(body.lora_name)
            return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")

    http = state.http
    if http.server_load_tracking:
        @app.get("/load")
        async def server_load(request: Request) -> dict:
            return {"server_load": _state(request).server_load}
    if http.tokenizer_info:
        @app.get("/tokenizer_info")
        async def tokenizer_info_route(request: Request) -> dict:
            return tokenizer_info(_state(request))

    # The middleware added last runs first: metrics also count the key check's 401s, and CORS
    # answers a browser's preflight before the key is asked for (it carries none). The user's
    # --middleware run inside ours, as in vLLM (added before them).
    for middleware in http.middleware:
        add_user_middleware(app, middleware)
    if http.server_load_tracking:
        app.add_middleware(ServerLoadMiddleware, state=state)
    if http.request_id_headers:
        app.add_middleware(RequestIdHeaderMiddleware)
    if state.api_key:
        app.add_middleware(APIKeyMiddleware, api_key=state.api_key)
    app.add_middleware(MetricsMiddleware, metrics=state.metrics)
    app.add_middleware(CORSMiddleware, allow_origins=http.allowed_origins, allow_methods=http.allowed_methods,
                       allow_headers=http.allowed_headers, allow_credentials=http.allow_credentials)
    state.metrics.attach_backend(state.backend)
    return app

