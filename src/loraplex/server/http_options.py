"""vLLM's HTTP flags: CORS and the docs pages (the app's, HTTPOptions) and uvicorn's own (TLS,
root path, its log). `loraplex serve-ray` takes the first kind; Ray Serve's proxy serves its
HTTP, so it refuses the second (UVICORN_FLAGS)."""

from __future__ import annotations

import argparse
import logging
import os
import socket
from dataclasses import dataclass, field

from loraplex.errors import ConfigError
from loraplex.server.demo_mode import listen_host
from loraplex.server.flag_types import json_flag

# The flags that configure `loraplex serve`'s uvicorn server, not the app.
UVICORN_FLAGS = ("--ssl-keyfile", "--ssl-certfile", "--ssl-ca-certs", "--ssl-cert-reqs", "--root-path",
                 "--uvicorn-log-level", "--disable-uvicorn-access-log")


@dataclass
class HTTPOptions:
    """The app's: CORS (a browser page of another origin may call the API; vLLM allows every
    origin by default) and the /docs pages."""
    allowed_origins: list = field(default_factory=lambda: ["*"])
    allowed_methods: list = field(default_factory=lambda: ["*"])
    allowed_headers: list = field(default_factory=lambda: ["*"])
    allow_credentials: bool = False
    docs: bool = True
    request_id_headers: bool = False    # X-Request-Id on every response
    force_include_usage: bool = False   # streams carry usage whatever stream_options says
    server_load_tracking: bool = False  # GET /load: generation requests in progress
    tokenizer_info: bool = False        # GET /tokenizer_info: the tokenizer's configuration
    middleware: list = field(default_factory=list)   # --middleware's ASGI classes and http functions


def add_http_arguments(parser: argparse.ArgumentParser) -> None:
    http = parser.add_argument_group("HTTP (vLLM's flags)")
    for flag, what in (("--allowed-origins", "origins"), ("--allowed-methods", "methods"),
                       ("--allowed-headers", "headers")):
        http.add_argument(flag, type=json_flag(flag, '["*"]', list), default=["*"], metavar="JSON",
                          help=f"CORS: the {what} a browser page may call the API with, a JSON list "
                               f"(default: [\"*\"], as vLLM)")
    http.add_argument("--allow-credentials", action="store_true", help="CORS: allow credentials (cookies)")
    http.add_argument("--disable-fastapi-docs", action="store_true", help="serve neither /docs nor /openapi.json")
    http.add_argument("--enable-request-id-headers", action="store_true",
                      help="every response carries X-Request-Id (the request's own, else a new one)")
    http.add_argument("--enable-force-include-usage", action="store_true",
                      help="every stream carries usage, in every chunk and at the end, whatever the request's "
                           "stream_options")
    http.add_argument("--enable-server-load-tracking", action="store_true",
                      help="GET /load answers {\"server_load\": N}, the generation requests in progress")
    http.add_argument("--enable-tokenizer-info-endpoint", action="store_true",
                      help="GET /tokenizer_info answers the tokenizer's configuration, special tokens and chat "
                           "template (off by default, as in vLLM: they may be private)")
    http.add_argument("--middleware", action="append", default=[], metavar="MODULE.NAME",
                      help="an ASGI middleware class or an async `http` middleware function to add to the app "
                           "(repeatable; imported at start-up, as vLLM does)")
    http.add_argument("--disable-access-log-for-endpoints", default=None, metavar="PATHS",
                      help="comma-separated paths whose requests get no access-log line, e.g. '/health,/metrics'")
    http.add_argument("--root-path", default="", help="the path prefix a proxy in front of the server "
                      "strips (ASGI root_path)")
    http.add_argument("--uvicorn-log-level", default=None,
                      choices=["critical", "error", "warning", "info", "debug", "trace"],
                      help="uvicorn's own log level (default: --log-level)")
    http.add_argument("--disable-uvicorn-access-log", action="store_true", help="no log line per HTTP request")
    http.add_argument("--ssl-keyfile", default=None, help="serve HTTPS: the private key file")
    http.add_argument("--ssl-certfile", default=None, help="serve HTTPS: the certificate file")
    http.add_argument("--ssl-ca-certs", default=None, help="CA certificates to verify clients with")
    http.add_argument("--ssl-cert-reqs", type=int, default=0,
                      help="whether a client certificate is required (Python's ssl.CERT_*: 0 none, 1 "
                           "optional, 2 required) (default: 0)")


def http_options_from_args(args: argparse.Namespace) -> HTTPOptions:
    from loraplex.server.middleware import import_middleware

    return HTTPOptions(allowed_origins=args.allowed_origins, allowed_methods=args.allowed_methods,
                       allowed_headers=args.allowed_headers, allow_credentials=args.allow_credentials,
                       docs=not args.disable_fastapi_docs, request_id_headers=args.enable_request_id_headers,
                       force_include_usage=args.enable_force_include_usage,
                       server_load_tracking=args.enable_server_load_tracking,
                       tokenizer_info=args.enable_tokenizer_info_endpoint,
                       middleware=[import_middleware(name) for name in args.middleware])


def uvicorn_flags_given(args: argparse.Namespace) -> list[str]:
    """The UVICORN_FLAGS set to anything but their defaults."""
    return [flag for flag in UVICORN_FLAGS
            if getattr(args, flag[2:].replace("-", "_"), None) not in (None, "", 0, False)]


def uvicorn_options(args: argparse.Namespace) -> dict:
    """uvicorn.Config's arguments from the flags."""
    for flag in ("ssl_keyfile", "ssl_certfile", "ssl_ca_certs"):
        path = getattr(args, flag)
        if path is not None and not os.path.isfile(path):
            raise ConfigError(f"--{flag.replace('_', '-')} {path}: no such file")
    if (args.ssl_keyfile is None) != (args.ssl_certfile is None):
        raise ConfigError("HTTPS needs both --ssl-keyfile and --ssl-certfile")
    # listen_host, not args.host: --demo's defaults are filled in later (build_state), after this
    # check of the TLS files, and a host left None would make uvicorn listen on every interface.
    return dict(host=listen_host(args), port=args.port, log_level=args.uvicorn_log_level or args.log_level,
                access_log=not args.disable_uvicorn_access_log, root_path=args.root_path,
                ssl_keyfile=args.ssl_keyfile, ssl_certfile=args.ssl_certfile, ssl_ca_certs=args.ssl_ca_certs,
                ssl_cert_reqs=args.ssl_cert_reqs, timeout_graceful_shutdown=args.graceful_shutdown_timeout)


def bind_listen_sockets(host: str, port: int) -> list[socket.socket]:
    """Sockets bound to host:port (every address the host resolves to, as uvicorn would bind),
    not yet listening: taken before the model loads, so a port in use fails the start-up at
    once, not after minutes of loading (vLLM binds first too)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise ConfigError(f"--host {host}: {e.strerror}; give an address or a name this machine resolves") from None
    sockets: list[socket.socket] = []
    try:
        for family, kind, proto, _, address in dict.fromkeys(infos):
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:   # beside an IPv4 socket of the same name, as asyncio binds
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(address)
    except OSError as e:
        for sock in sockets:
            sock.close()
        raise ConfigError(f"cannot listen on {host}:{port}: {e.strerror} (another server there?); stop it "
                          f"or pass another --port") from None
    return sockets


class AccessLogFilter(logging.Filter):
    """--disable-access-log-for-endpoints (vLLM's): no access-log line for these paths (any query)."""

    def __init__(self, paths: list[str]) -> None:
        super().__init__()
        self.paths = {p.strip() for p in paths if p.strip()}

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args if isinstance(record.args, tuple) else ()
        # uvicorn's access line: (client, method, path with query, HTTP version, status)
        return not (len(args) >= 3 and str(args[2]).split("?", 1)[0] in self.paths)
