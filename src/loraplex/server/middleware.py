"""ASGI middlewares: API-key check, per-route request metrics, X-Request-Id and server load.

Plain ASGI (not BaseHTTPMiddleware) so streaming responses and client
disconnects pass through untouched.
"""

from __future__ import annotations

import hmac
import json
import uuid

from loraplex.server.errors import error_body
from loraplex.server.metrics import ServerMetrics

PROTECTED_PREFIX = "/v1"
KNOWN_METHODS = frozenset({"GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"})


class APIKeyMiddleware:
    """Every /v1/* route requires `Authorization: Bearer <key>` when a key is set."""

    def __init__(self, app, api_key: str) -> None:
        self.app = app
        self._expected = f"Bearer {api_key}".encode()

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith(PROTECTED_PREFIX):
            return await self.app(scope, receive, send)
        if scope["method"] == "OPTIONS":   # CORS preflight carries no credentials
            return await self.app(scope, receive, send)
        given = dict(scope["headers"]).get(b"authorization", b"")
        if hmac.compare_digest(given, self._expected):
            return await self.app(scope, receive, send)
        message = ("missing Authorization header; send 'Authorization: Bearer <api key>'"
                   if not given else "invalid API key in the Authorization header")
        body = json.dumps(error_body(401, message)).encode()
        await send({"type": "http.response.start", "status": 401,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(body)).encode()),
                                (b"www-authenticate", b"Bearer")]})
        await send({"type": "http.response.body", "body": body})


class MetricsMiddleware:
    """Counts every HTTP request by route template (bounded), method and status."""

    def __init__(self, app, metrics: ServerMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = 500

        async def send_and_record(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        self.metrics.in_flight.inc()
        try:
            await self.app(scope, receive, send_and_record)
        finally:
            self.metrics.in_flight.dec()
            route = scope.get("route")
            # Unmatched paths share one label so random URLs cannot blow up cardinality.
            path = getattr(route, "path", None) or "unmatched"
            method = scope["method"] if scope["method"] in KNOWN_METHODS else "other"
            self.metrics.observe_http(path, method, status)


class RequestIdHeaderMiddleware:
    """--enable-request-id-headers (vLLM's): every response carries X-Request-Id, the request's
    own header if it sent one, else a new id."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        given = dict(scope["headers"]).get(b"x-request-id") or uuid.uuid4().hex.encode()

        async def send_with_id(message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), (b"x-request-id", given)]}
            await send(message)
        await self.app(scope, receive, send_with_id)


GENERATION_PATHS = frozenset({"/v1/completions", "/v1/chat/completions", "/v1/responses"})


class ServerLoadMiddleware:
    """--enable-server-load-tracking (vLLM's): counts the generation requests in progress, streams
    until their last byte, for GET /load."""

    def __init__(self, app, state) -> None:
        self.app = app
        self.state = state

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["path"] not in GENERATION_PATHS:
            return await self.app(scope, receive, send)
        self.state.server_load += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.state.server_load -= 1


def import_middleware(name: str):
    """--middleware MODULE.NAME (vLLM's): an ASGI middleware class, or an async function taking
    (request, call_next) as FastAPI's `http` middleware; anything else stops the start-up
    (imported with the flags, before the model loads)."""
    import importlib
    import inspect

    from loraplex.errors import ConfigError
    module_name, _, attr = name.rpartition(".")
    try:
        imported = getattr(importlib.import_module(module_name), attr) if module_name else None
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"--middleware {name}: cannot import it ({e}); give MODULE.NAME of a module on "
                          f"the server's Python path") from None
    if not (inspect.isclass(imported) or inspect.iscoroutinefunction(imported)):
        raise ConfigError(f"--middleware {name}: it must name an ASGI middleware class or an async function "
                          f"(request, call_next)")
    return imported


def add_user_middleware(app, middleware) -> None:
    """Add what import_middleware returned: a class as ASGI middleware, a function as `http` middleware."""
    import inspect

    if inspect.isclass(middleware):
        app.add_middleware(middleware)
    else:
        app.middleware("http")(middleware)
