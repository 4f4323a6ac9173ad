"""`loraplex serve-ray`: `loraplex serve`'s flags, plus how many replicas and which Ray cluster.

It starts a local Ray cluster (or joins one with --ray-address), starts Ray Serve's
HTTP proxy on --host/--port, deploys the application (loraplex.ray.application) and
waits. SIGINT or SIGTERM deletes the application (replicas finish their requests,
up to --graceful-shutdown-timeout) and stops the local cluster it started.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import threading

from loraplex.errors import ConfigError

logger = logging.getLogger("loraplex.ray")

LOCAL_CLUSTER = "local"
ROUTINGS = ("adapter", "default")


def add_ray_arguments(parser: argparse.ArgumentParser) -> None:
    ray = parser.add_argument_group("Ray")
    ray.add_argument("--replicas", type=int, default=1, metavar="N",
                     help="engine replicas, each a whole engine (default: 1); with autoscaling, "
                          "the number it starts with")
    ray.add_argument("--ray-address", default=None, metavar="ADDRESS",
                     help="Ray cluster to join: 'auto' (the one `ray start` runs on this machine), "
                          "HOST:PORT of its head, or ray://HOST:10001 (default: start a local cluster)")
    ray.add_argument("--ray-app-name", default="loraplex", help="Ray Serve application name (default: loraplex)")
    ray.add_argument("--ray-min-replicas", type=int, default=None, metavar="N",
                     help="autoscale the replicas between this and --ray-max-replicas (default: 1)")
    ray.add_argument("--ray-max-replicas", type=int, default=None, metavar="N",
                     help="autoscaling's upper bound; giving it turns autoscaling on")
    ray.add_argument("--ray-target-ongoing-requests", type=float, default=None, metavar="N",
                     help="autoscaling target: requests in flight per replica (Ray's default: 2)")
    ray.add_argument("--ray-max-ongoing-requests", type=int, default=None, metavar="N",
                     help="requests Ray sends one replica at once; more wait in Ray's queue "
                          "(default: --max-num-seqs)")
    ray.add_argument("--ray-replica-cpus", type=float, default=1.0, metavar="N",
                     help="CPUs Ray reserves per replica (default: 1)")
    ray.add_argument("--ray-replica-gpus", type=float, default=None, metavar="N",
                     help="GPUs per replica (default: --tensor-parallel-size when the cluster has "
                          "GPUs and --device is not cpu, else 0)")
    ray.add_argument("--ray-routing", default="adapter", choices=ROUTINGS,
                     help="adapter: send each request to a replica that holds its adapter (Ray "
                          "Serve's model multiplexing); default: Ray's default routing, blind to "
                          "adapters (for comparison) (default: adapter)")


def resolve_args(args: argparse.Namespace) -> None:
    """Fill in what `loraplex serve` decides at start-up (--demo's model and environment, the
    API key from VLLM_API_KEY), so that every replica and the ingress get the same values."""
    from loraplex.server.demo_mode import apply_demo_args
    from loraplex.server.serve import API_KEY_ENV, read_chat_template
    from loraplex.server.vllm_flags import check_vllm_flags

    apply_demo_args(args)
    check_vllm_flags(args)
    args.chat_template = read_chat_template(args.chat_template)   # its text: the replicas need no file
    if args.api_key is None:
        args.api_key = os.environ.get(API_KEY_ENV) or None


def start(args: argparse.Namespace) -> None:
    """Connect to (or start) the cluster, start Serve's proxy and deploy the application."""
    import ray
    from ray import serve

    from loraplex.ray.application import build_ray_app

    if args.ray_address in (None, LOCAL_CLUSTER):
        ray.init(address=LOCAL_CLUSTER, include_dashboard=False)
    else:
        ray.init(address=args.ray_address)
    # SIGTERM as Ctrl-C while the application starts (cmd_serve_ray stops what was started);
    # set after ray.init, whose own handler aborts the process.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    serve.start(http_options={"host": args.host, "port": args.port})
    serve.run(build_ray_app(args), name=args.ray_app_name, route_prefix="/")


def stop(args: argparse.Namespace) -> None:
    """Delete the application (replicas drain) and stop the cluster if this process started it."""
    import ray
    from ray import serve

    if not ray.is_initialized():
        return
    try:
        serve.delete(args.ray_app_name)
    finally:
        if args.ray_address in (None, LOCAL_CLUSTER):
            serve.shutdown()
            ray.shutdown()


def wait_for_signal() -> None:
    stop_requested = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop_requested.set())
    stop_requested.wait()


def cmd_serve_ray(args: argparse.Namespace) -> int:
    logging.getLogger("loraplex").setLevel(args.log_level.upper())
    try:
        import ray.serve  # noqa: F401
    except ImportError:
        logger.error("loraplex serve-ray needs Ray Serve: pip install 'loraplex[ray]'")
        return 2
    try:
        resolve_args(args)
        from loraplex.ray.application import check_flags
        from loraplex.server.serve import engine_config_from_args
        engine_config_from_args(args)   # a bad flag fails here, before Ray starts
        check_flags(args)
        start(args)
    except KeyboardInterrupt:
        logger.warning("interrupted while starting: stopping")
        stop(args)
        return 130
    except ConfigError as e:
        logger.error("%s", e)
        stop(args)
        return 2
    except Exception as e:   # noqa: BLE001 - e.g. a replica failed to start: Ray's message says why
        logger.error("the Ray Serve application did not start: %s", e)
        stop(args)
        return 3
    replicas = f"{args.replicas} replica(s)" if args.ray_max_replicas is None and args.ray_min_replicas is None \
        else "autoscaled replicas"
    logger.info("serving %s with %s on http://%s:%d (OpenAI API under /v1)", args.model, replicas,
                args.host, args.port)
    wait_for_signal()
    logger.info("stopping: deleting the Ray Serve application %r", args.ray_app_name)
    stop(args)
    return 0
