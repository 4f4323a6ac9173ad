"""ASGI middlewares: API-key check and per-route request metrics.

Plain ASGI (not BaseHTTPMiddleware) so streaming responses and client
disconnects pass through untouched.
"""

from __future__ import annotations

import hmac
import json

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
