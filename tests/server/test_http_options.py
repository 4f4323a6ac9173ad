"""vLLM's HTTP flags: CORS (a browser page of another origin may call the API, its preflight
answered without the API key), the docs pages, and uvicorn's settings (TLS, root path, its log)."""

import argparse

import httpx
import pytest

from loraplex.errors import ConfigError
from loraplex.server.app import build_app
from loraplex.server.backend import ServingBackend
from loraplex.server.cli import build_parser
from loraplex.server.http_options import http_options_from_args, uvicorn_options
from loraplex.server.state import ServerState
from server.fake_engine import FakeEngine
from server.harness import API_KEY, ServerThread


def serve_args(*flags: str) -> argparse.Namespace:
    return build_parser().parse_args(["serve", "/models/tiny", *flags])


def server_with(*flags: str, step_delay_s: float = 0.0) -> ServerThread:
    engine = FakeEngine(step_delay_s=step_delay_s)

    def make_app():
        backend = ServingBackend(engine, served_model_names=["tiny-base"], model_path="/models/tiny",
                                 max_model_len=engine.max_model_len)
        return build_app(ServerState(backend, api_key=API_KEY, http=http_options_from_args(serve_args(*flags))))
    return ServerThread(make_app)


PREFLIGHT = {"Origin": "https://app.example", "Access-Control-Request-Method": "POST",
             "Access-Control-Request-Headers": "authorization, content-type"}


def test_a_browser_page_may_call_the_api_by_default_as_in_vllm():
    with server_with() as server:
        r = httpx.options(server.base_url + "/v1/chat/completions", headers=PREFLIGHT)
        assert r.status_code == 200, r.text                        # no API key asked of a preflight
        assert r.headers["access-control-allow-origin"] == "*"
        assert "POST" in r.headers["access-control-allow-methods"]
        r = httpx.get(server.base_url + "/v1/models", headers={"Origin": "https://app.example",
                                                                 "Authorization": f"Bearer {API_KEY}"})
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "*"
        assert httpx.get(server.base_url + "/v1/models", headers={"Origin": "https://app.example"}).status_code == 401
        assert httpx.get(server.base_url + "/docs").status_code == 200


def test_origins_can_be_restricted_and_the_docs_turned_off():
    with server_with("--allowed-origins", '["https://app.example"]', "--allow-credentials",
                     "--disable-fastapi-docs") as server:
        ok = httpx.options(server.base_url + "/v1/completions", headers=PREFLIGHT)
        assert ok.status_code == 200 and ok.headers["access-control-allow-origin"] == "https://app.example"
        assert ok.headers["access-control-allow-credentials"] == "true"
        other = httpx.options(server.base_url + "/v1/completions", headers={**PREFLIGHT, "Origin": "https://evil.example"})
        assert other.status_code == 400 and "access-control-allow-origin" not in other.headers
        assert httpx.get(server.base_url + "/docs").status_code == 404
        assert httpx.get(server.base_url + "/openapi.json").status_code == 404


def test_uvicorn_settings_come_from_vllms_flags(tmp_path):
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    key.write_text("k")
    cert.write_text("c")
    options = uvicorn_options(serve_args("--ssl-keyfile", str(key), "--ssl-certfile", str(cert), "--ssl-cert-reqs",
                                         "2", "--root-path", "/llm", "--uvicorn-log-level", "error",
                                         "--disable-uvicorn-access-log"))
    assert (options["ssl_keyfile"], options["ssl_certfile"], options["ssl_cert_reqs"]) == (str(key), str(cert), 2)
    assert (options["root_path"], options["log_level"], options["access_log"]) == ("/llm", "error", False)
    defaults = uvicorn_options(serve_args())
    assert (defaults["log_level"], defaults["access_log"], defaults["ssl_keyfile"]) == ("info", True, None)
    with pytest.raises(ConfigError, match="--ssl-keyfile .*: no such file"):
        uvicorn_options(serve_args("--ssl-keyfile", str(tmp_path / "nope"), "--ssl-certfile", str(cert)))
    with pytest.raises(ConfigError, match="needs both --ssl-keyfile and --ssl-certfile"):
        uvicorn_options(serve_args("--ssl-certfile", str(cert)))
    with pytest.raises(SystemExit):
        serve_args("--allowed-origins", "*")                          # a JSON list, as in vLLM


def test_serve_ray_refuses_the_flags_of_serves_own_http_server():
    from loraplex.ray.application import check_flags

    args = build_parser().parse_args(["serve-ray", "/models/tiny", "--root-path", "/llm"])
    with pytest.raises(ConfigError, match="--root-path configure `loraplex serve`'s own HTTP server"):
        check_flags(args)
    check_flags(build_parser().parse_args(["serve-ray", "/models/tiny", "--allowed-origins", '["https://a"]']))


def test_a_port_in_use_stops_serve_before_the_model_loads(tmp_path):
    """`loraplex serve` takes its port first (as vLLM does): with the port held by another
    process's socket it exits 2 at once, saying so, and no engine process ever starts."""
    import socket
    import subprocess
    import sys

    from loraplex.demo import demo_model_path
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run([sys.executable, "-m", "loraplex.server.cli", "serve", str(demo_model_path()),
                               "--device", "cpu", "--host", "127.0.0.1", "--port", str(port)],
                              capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert f"cannot listen on 127.0.0.1:{port}: Address already in use" in done.stderr
    assert "engine process" not in done.stderr and "loaded 56 tensors" not in done.stderr


def test_a_bad_loader_thread_count_stops_serve_before_the_engine_starts():
    import os
    import subprocess
    import sys

    from loraplex.demo import demo_model_path
    done = subprocess.run([sys.executable, "-m", "loraplex.server.cli", "serve", str(demo_model_path()),
                           "--device", "cpu", "--host", "127.0.0.1", "--port", "0"],
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, "LORAPLEX_ADAPTER_LOADER_THREADS": "0"})
    assert done.returncode == 2, done.stderr
    assert "LORAPLEX_ADAPTER_LOADER_THREADS='0': give a whole number of threads, at least 1" in done.stderr
    assert "Traceback" not in done.stderr and "loaded 56 tensors" not in done.stderr


def test_serve_binds_what_the_host_resolves_to():
    from loraplex.server.http_options import bind_listen_sockets

    sockets = bind_listen_sockets("127.0.0.1", 0)
    try:
        assert [s.getsockname()[0] for s in sockets] == ["127.0.0.1"] and not sockets[0].get_inheritable()
        sockets[0].listen()          # as uvicorn does once the app has started
        with pytest.raises(ConfigError, match=f"cannot listen on 127.0.0.1:{sockets[0].getsockname()[1]}"):
            bind_listen_sockets("127.0.0.1", sockets[0].getsockname()[1])
    finally:
        for s in sockets:
            s.close()
    with pytest.raises(ConfigError, match="--host no-such-host.invalid"):
        bind_listen_sockets("no-such-host.invalid", 0)


def test_request_id_headers_usage_load_and_user_middleware():
    """vLLM's --enable-request-id-headers, --enable-force-include-usage, --enable-server-load-tracking
    and --middleware, on a server with all of them and one with none."""
    import json

    headers = {"Authorization": f"Bearer {API_KEY}"}
    body = {"prompt": "xyz", "max_tokens": 3, "stream": True}
    with server_with("--enable-request-id-headers", "--enable-force-include-usage", "--enable-server-load-tracking",
                     "--middleware", "server.middleware_example.TagMiddleware",
                     "--middleware", "server.middleware_example.tag_function", step_delay_s=0.2) as server:
        r = httpx.get(server.base_url + "/health", headers={"X-Request-Id": "abc-1"})
        assert r.headers["x-request-id"] == "abc-1" and r.headers["x-tag"] == "class"
        assert r.headers["x-tag-function"] == "yes"
        assert len(httpx.get(server.base_url + "/version").headers["x-request-id"]) == 32     # a new id
        with httpx.stream("POST", server.base_url + "/v1/completions", json=body, headers=headers) as r:
            lines = r.iter_lines()
            chunks = [json.loads(next(line for line in lines if line.startswith("data: {"))[6:])]
            assert httpx.get(server.base_url + "/load").json() == {"server_load": 1}     # this stream
            chunks += [json.loads(line[6:]) for line in lines if line.startswith("data: {")]
        assert all(c.get("usage") for c in chunks) and chunks[-1]["choices"] == []     # usage though not asked
        assert httpx.get(server.base_url + "/load").json() == {"server_load": 0}
        with httpx.stream("POST", server.base_url + "/v1/responses", headers=headers,
                          json={"input": "xyz", "max_output_tokens": 3, "stream": True}) as r:
            lines = r.iter_lines()
            next(line for line in lines if line.startswith("data: {"))
            assert httpx.get(server.base_url + "/load").json() == {"server_load": 1}     # a Responses stream too
            assert r.headers["x-request-id"] and "response.incomplete" in "".join(lines)
        assert httpx.get(server.base_url + "/load").json() == {"server_load": 0}
    with server_with() as server:
        r = httpx.get(server.base_url + "/health")
        assert "x-request-id" not in r.headers and "x-tag" not in r.headers
        assert httpx.get(server.base_url + "/load").status_code == 404
        assert httpx.get(server.base_url + "/tokenizer_info").status_code == 404     # off by default, as in vLLM
        with httpx.stream("POST", server.base_url + "/v1/completions", json=body, headers=headers) as r:
            chunks = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
        assert not any(c.get("usage") for c in chunks)
    for name, message in (("server.middleware_example.NOT_MIDDLEWARE", "it must name an ASGI middleware class"),
                          ("server.no_such_module.X", "cannot import it")):
        with pytest.raises(ConfigError, match=f"--middleware {name}: {message}"):
            http_options_from_args(serve_args("--middleware", name))


def test_access_log_lines_can_be_left_out_for_some_paths():
    import logging

    from loraplex.server.http_options import AccessLogFilter

    def record(path):
        return logging.LogRecord("uvicorn.access", logging.INFO, "", 0, '%s - "%s %s HTTP/%s" %d',
                                 ("127.0.0.1:5", "GET", path, "1.1", 200), None)
    keep = AccessLogFilter(" /health,/metrics ".split(","))
    assert not keep.filter(record("/health")) and not keep.filter(record("/metrics?x=1"))
    assert keep.filter(record("/v1/models")) and keep.filter(record("/healthz"))
