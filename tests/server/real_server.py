"""Start the real server (real engine, tiny model) in-process, the way `loraplex serve` does."""

from __future__ import annotations

import os
from contextlib import contextmanager

from loraplex.plugins.loader import reset_plugins
from loraplex.server.app import build_app
from loraplex.server.cli import build_parser
from loraplex.server.serve import build_state
from server.harness import ServerThread


@contextmanager
def patched_env(values: dict[str, str]):
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextmanager
def real_server(argv: list[str], env: dict[str, str], engine_process: bool = False):
    """`argv` as after `loraplex` (e.g. ["serve", MODEL, "--enable-lora", ...]); `env` is set
    for the server's lifetime. Plugins are reloaded so the env's VLLM_PLUGINS applies.

    The engine loop runs in a thread of this process (--disable-frontend-multiprocessing), so
    tests can look at the engine's state; with engine_process=True it runs in an engine
    process, as `loraplex serve` runs it (serve_process.py runs the whole of `loraplex serve`
    as a subprocess)."""
    args = build_parser().parse_args([*argv] if engine_process else [*argv, "--disable-frontend-multiprocessing"])
    with patched_env(env):
        reset_plugins()
        server = ServerThread(lambda: build_app(build_state(args)))
        try:
            server.start()
            server.state = server.app.state.loraplex
            yield server
        finally:
            server.stop()
            reset_plugins()


def lora_manager(server):
    """The real engine's LoRA manager (to check what the engine holds)."""
    return server.state.backend.engine.engine.runner.lora.manager
