"""`loraplex serve --demo`: serve the embedded demo model and adapters.

--demo only fills in what a user would otherwise type: the model path (the
checkpoint shipped in loraplex/demo), the served name, --enable-lora, and the
environment that points the filesystem resolver at the shipped adapters with
resolution on first request. Everything then loads through the ordinary paths.
"""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import MutableMapping
from pathlib import Path

from loraplex.demo import DEMO_BASE_MODEL_NAME, demo_adapters_dir, demo_model_path
from loraplex.errors import ConfigError
from loraplex.plugins.selection import PLUGINS_ENV, requested_plugins
from loraplex.resolvers.filesystem import CACHE_DIR_ENV

logger = logging.getLogger("loraplex.server")

# The name the shipped adapters give as their base (base_model_name_or_path).
DEMO_SERVED_NAME = DEMO_BASE_MODEL_NAME
DEFAULT_HOST, DEMO_HOST = "0.0.0.0", "127.0.0.1"


def demo_environment() -> dict[str, str]:
    """The variables --demo sets when the user has not set them."""
    return {PLUGINS_ENV: "lora_filesystem_resolver",
            CACHE_DIR_ENV: str(demo_adapters_dir()),
            "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True"}


def hides_demo_adapters(key: str, kept: str, demo_value: str) -> bool:
    """Whether a value the user set, kept by --demo, stops the shipped adapters from resolving."""
    if key == PLUGINS_ENV:
        return demo_value not in (requested_plugins({key: kept}) or [])
    if key == CACHE_DIR_ENV:
        return Path(kept).expanduser().resolve() != Path(demo_value)
    return False


def listen_host(args: argparse.Namespace) -> str:
    """The address to listen on: --host, else this machine only with --demo (it turns runtime
    adapter loading on: any client may load a server-side path), else all interfaces."""
    if args.host is not None:
        return args.host
    return DEMO_HOST if getattr(args, "demo", False) else DEFAULT_HOST


def apply_demo_args(args: argparse.Namespace, environ: MutableMapping[str, str] = os.environ) -> None:
    """Fill in `args` (and `environ`) for --demo; without --demo, insist on MODEL."""
    is_demo = getattr(args, "demo", False)
    if hasattr(args, "host"):
        args.host = listen_host(args)
    if not is_demo:
        if args.model is None:
            raise ConfigError("loraplex serve needs MODEL, the base model's checkpoint directory "
                              "(or --demo to serve the small model shipped with loraplex)")
        return
    if args.model is not None:
        raise ConfigError(f"--demo serves the model shipped with loraplex; leave out MODEL "
                          f"({args.model!r}) or drop --demo")
    args.model = str(demo_model_path())
    args.served_model_name = args.served_model_name or [DEMO_SERVED_NAME]
    args.enable_lora = True
    if getattr(args, "max_loras", None) is None:
        from loraplex.server.serve import DEMO_MAX_LORAS
        args.max_loras = DEMO_MAX_LORAS   # (without --demo the default is vLLM's 1)
    for key, value in demo_environment().items():
        if environ.get(key) and hides_demo_adapters(key, environ[key], value):
            logger.warning("--demo: keeping %s=%s from the environment, so the demo adapters in %s "
                           "will not resolve; unset it to serve them", key, environ[key],
                           demo_environment()[CACHE_DIR_ENV])
        elif environ.get(key):
            logger.info("--demo: keeping %s=%s from the environment", key, environ[key])
        else:
            environ[key] = value
            logger.info("--demo: %s=%s", key, value)
