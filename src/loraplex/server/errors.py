"""The one place where exceptions become HTTP statuses and OpenAI error objects.

Every error response of the server has OpenAI's shape:
    {"error": {"message": str, "type": str, "param": str | None, "code": int}}
(`code` is the HTTP status, as vLLM sends it). Route code raises loraplex errors;
the handlers installed by `install_error_handlers` turn them into responses.

Messages never show the server's own directories: the adapter cache's root (and the
filesystem resolver's directory, the same VLLM_LORA_RESOLVER_CACHE_DIR) is replaced by the
variable's name, so a client learns which adapter and setting are involved, not the paths.
"""

from __future__ import annotations

import logging
import os
import re
from http import HTTPStatus

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from loraplex.errors import (
    AdapterCapacityError,
    AdapterInvalidError,
    AdapterNameError,
    AdapterNotFoundError,
    ConfigError,
    EngineDeadError,
    InvalidRequestError,
    LoraplexError,
    ResolverError,
)
from loraplex.resolvers.cache import CACHE_DIR_ENV
from loraplex.resolvers.holds import LOCK_DIR, TMP_DIR, cache_roots

logger = logging.getLogger(__name__)

_BOOKKEEPING_PATH = re.compile(rf"\${CACHE_DIR_ENV}/(?:{re.escape(TMP_DIR)}|{re.escape(LOCK_DIR)})[^\s'\"]*")


# vLLM's `type` for a management call's bad input (an empty name, a duplicate adapter).
INVALID_USER_INPUT = "InvalidUserInput"


class HTTPError(LoraplexError):
    """An error raised by the server itself with an explicit status (401, 404 of a
    route, 400 of a management call...) and, where vLLM sends a specific one, its type."""

    def __init__(self, status: int, message: str, *, param: str | None = None,
                 error_type: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.param = param
        self.error_type = error_type


# Most specific first: the first class an exception is an instance of decides.
# AdapterNotFoundError (404) precedes the ValueError fallback it does not inherit
# from; the Adapter*Error classes that are ValueErrors are listed before ValueError.
STATUS_BY_EXCEPTION: tuple[tuple[type[BaseException], int], ...] = (
    (AdapterNotFoundError, 404),
    (AdapterNameError, 400),
    (AdapterInvalidError, 400),
    (AdapterCapacityError, 503),   # every slot pinned or busy: retry later
    (ResolverError, 502),          # the adapter source (S3, Hub...) failed
    (InvalidRequestError, 400),
    (ConfigError, 500),            # a server setting, not the caller's fault
    (EngineDeadError, 503),
    (LoraplexError, 400),
    (ValueError, 400),             # engine-side validation of sampling values
    (TypeError, 400),
)


def status_for_exception(exc: BaseException) -> int:
    if isinstance(exc, HTTPError):
        return exc.status
    for exc_type, status in STATUS_BY_EXCEPTION:
        if isinstance(exc, exc_type):
            return status
    return 500


def error_type_for_status(status: int) -> str:
    """vLLM's type names: the HTTP reason phrase in CamelCase + 'Error'."""
    try:
        phrase = HTTPStatus(status).phrase
    except ValueError:
        return "Error"
    name = "".join(word.capitalize() for word in phrase.replace("-", " ").split())
    if name == "UnprocessableEntity":
        name = "BadRequest"
    return name if name.endswith("Error") else name + "Error"


def error_body(status: int, message: str, param: str | None = None, error_type: str | None = None) -> dict:
    return {"error": {"message": message, "type": error_type or error_type_for_status(status),
                      "param": param, "code": status}}


def error_response(status: int, message: str, param: str | None = None,
                   headers: dict | None = None) -> JSONResponse:
    return JSONResponse(error_body(status, message, param), status_code=status, headers=headers)


def exception_to_body(exc: BaseException) -> tuple[int, dict]:
    """(status, OpenAI error body) for any exception; also used inside SSE streams."""
    status = status_for_exception(exc)
    if status >= 500 and not isinstance(exc, (LoraplexError,)):
        logger.exception("internal error while serving a request", exc_info=exc)
        message = f"internal server error ({type(exc).__name__}: {exc})"
    else:
        message = str(exc) or type(exc).__name__
    message = redact_server_paths(message)
    param = getattr(exc, "param", None)
    if param is None and isinstance(exc, (AdapterNotFoundError, AdapterNameError, AdapterInvalidError)):
        param = "model"   # a generation request's adapter; management calls set their own field
    return status, error_body(status, message, param, getattr(exc, "error_type", None))


def redact_server_paths(message: str) -> str:
    """`message` with the adapter cache directories replaced by the setting that names them."""
    roots = {os.environ.get(CACHE_DIR_ENV, "").strip(), *cache_roots()}
    roots |= {os.path.realpath(r) for r in roots if r}
    # Longest first: a root inside another is replaced as a whole.
    for root in sorted((r.rstrip("/") for r in roots if r and r != "/"), key=len, reverse=True):
        message = message.replace(root, f"${CACHE_DIR_ENV}")
    # The cache's own bookkeeping (downloads in progress, locks) says nothing to a client.
    return _BOOKKEEPING_PATH.sub(f"${CACHE_DIR_ENV} (a temporary file of the adapter cache)", message)


def _format_validation_error(exc: RequestValidationError) -> tuple[str, str | None]:
    parts, param = [], None
    for err in exc.errors():
        loc = [str(p) for p in err.get("loc", ()) if p != "body"]
        where = ".".join(loc) or "body"
        param = param or (loc[0] if loc else None)
        parts.append(f"{where}: {err.get('msg', 'invalid value')}")
    message = "invalid request: " + "; ".join(parts) if parts else "invalid request body"
    return message, param


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _format_validation_error(exc)
        return error_response(400, message, param)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = exc.detail if isinstance(exc.detail, str) else HTTPStatus(exc.status_code).phrase
        if exc.status_code == 404:
            message = f"no route {request.method} {request.url.path}; see GET /docs for the API"
        return error_response(exc.status_code, message, headers=getattr(exc, "headers", None))

    async def _mapped(request: Request, exc: Exception) -> JSONResponse:
        status, body = exception_to_body(exc)
        return JSONResponse(body, status_code=status)

    # Explicit classes are handled inside the app; `Exception` is the last resort
    # (Starlette then also logs the traceback).
    for exc_type in (LoraplexError, ValueError, TypeError, Exception):
        app.add_exception_handler(exc_type, _mapped)
