"""build_ray_app: `loraplex serve-ray`'s flags -> the Ray Serve application.

Three deployments: LoRAIngress (the HTTP front, no CPU reserved), LoRAReplica (N
engines: one GPU each when there are GPUs, --ray-replica-cpus otherwise; a fixed
--replicas count or Ray's autoscaling between --ray-min-replicas and
--ray-max-replicas) and ReplicaDirectory (one, no CPU reserved).

Replicas may start on other nodes, whose environment is not this one's: the
variables that configure loraplex, its resolvers and their sources (VLLM_*,
LORAPLEX_*, AWS_*, HF_*) are passed to every deployment through Ray's runtime_env.
"""

from __future__ import annotations

import argparse
import copy
import json
import os

from ray import serve

from loraplex.errors import ConfigError
from loraplex.ray.directory import ReplicaDirectory
from loraplex.ray.ingress import LoRAIngress
from loraplex.ray.replica import LoRAReplica
from loraplex.server.http_options import uvicorn_flags_given
from loraplex.server.serve import engine_config_from_args

FORWARDED_ENV_PREFIXES = ("VLLM_", "LORAPLEX_", "AWS_", "HF_")
# The ingress only awaits the replicas: it may hold many requests at once.
INGRESS_MAX_ONGOING_REQUESTS = 4096


def forwarded_environment(environ=os.environ) -> dict[str, str]:
    return {k: v for k, v in environ.items() if k.startswith(FORWARDED_ENV_PREFIXES)}


def replica_gpus(args: argparse.Namespace) -> float:
    """--ray-replica-gpus, or by default one GPU per replica (--tensor-parallel-size GPUs with
    tensor parallelism) unless told to run on the CPU or the cluster has no GPU (its
    replicas then run on the CPU)."""
    if args.ray_replica_gpus is not None:
        return args.ray_replica_gpus
    if args.device == "cpu":
        return 0
    import ray

    has_gpus = ray.is_initialized() and ray.cluster_resources().get("GPU", 0) > 0
    if args.device == "cuda" and not has_gpus:
        raise ConfigError("--device cuda, but the Ray cluster has no GPU; start its nodes with GPUs, "
                          "or use --device cpu")
    return args.tensor_parallel_size if has_gpus else 0


def scaling_options(args: argparse.Namespace) -> dict:
    """num_replicas, or Ray's autoscaling_config when --ray-min/max-replicas are given."""
    autoscaled = args.ray_min_replicas is not None or args.ray_max_replicas is not None
    if not autoscaled:
        if args.ray_target_ongoing_requests is not None:
            raise ConfigError("--ray-target-ongoing-requests needs autoscaling: give --ray-max-replicas")
        if args.replicas < 1:
            raise ConfigError(f"--replicas must be >= 1, got {args.replicas}")
        return {"num_replicas": args.replicas}
    low = args.ray_min_replicas if args.ray_min_replicas is not None else 1
    high = args.ray_max_replicas if args.ray_max_replicas is not None else max(low, args.replicas)
    if not 0 <= low <= high or high < 1:
        raise ConfigError(f"autoscaling needs 0 <= --ray-min-replicas <= --ray-max-replicas and "
                          f"--ray-max-replicas >= 1, got {low} and {high}")
    config = {"min_replicas": low, "max_replicas": high,
              "initial_replicas": min(max(args.replicas, low), high)}
    if args.ray_target_ongoing_requests is not None:
        config["target_ongoing_requests"] = args.ray_target_ongoing_requests
    return {"autoscaling_config": config}


def check_flags(args: argparse.Namespace) -> None:
    """Refuse what the Ray deployment does not do (yet), and bad scaling flags: before Ray starts."""
    scaling_options(args)
    given = uvicorn_flags_given(args)            # Ray Serve's proxy serves HTTP here
    if given:
        raise ConfigError(f"{', '.join(given)} configure `loraplex serve`'s own HTTP server; with serve-ray, "
                          f"Ray Serve's proxy serves HTTP (TLS and a root path are set in Ray Serve's "
                          f"http_options or the proxy in front of it)")


def build_ray_app(args: argparse.Namespace) -> serve.Application:
    """args: `loraplex serve-ray`'s flags after resolve_args (model path, names and key filled in)."""
    config = engine_config_from_args(args)   # every engine flag checked before anything starts
    check_flags(args)
    max_ongoing = args.ray_max_ongoing_requests or config.max_num_seqs
    runtime_env = {"env_vars": forwarded_environment()}
    # Calls between deployments are not logged one by one (the ingress logs each HTTP request).
    quiet = {"enable_access_log": False}
    directory = serve.deployment(ReplicaDirectory, num_replicas=1, max_ongoing_requests=1024, logging_config=quiet,
                                 ray_actor_options={"num_cpus": 0, "runtime_env": runtime_env}).bind()
    replica = serve.deployment(
        LoRAReplica, max_ongoing_requests=max_ongoing, logging_config=quiet,
        graceful_shutdown_timeout_s=args.graceful_shutdown_timeout,
        ray_actor_options={"num_cpus": args.ray_replica_cpus, "num_gpus": replica_gpus(args),
                           "runtime_env": runtime_env},
        **scaling_options(args))
    # Ray's router keeps, per replica, the adapters it holds; the engine keeps as many in its
    # CPU cache: what Ray believes a replica holds is what the replica holds.
    replicas = replica.bind(replica_args(args), directory, config.max_cpu_loras)
    ingress = serve.deployment(LoRAIngress, max_ongoing_requests=INGRESS_MAX_ONGOING_REQUESTS,
                               ray_actor_options={"num_cpus": 0, "runtime_env": runtime_env})
    return ingress.bind(args, replicas, directory, args.ray_routing == "adapter")


def app_builder(config: dict) -> serve.Application:
    """Ray Serve's application builder, for config files (`serve deploy`, KubeRay's
    RayService): `import_path: loraplex.ray.application:app_builder`, and `args` holding
    serve-ray's flags by name, e.g. {"model": "/models/base", "enable-lora": true,
    "max-loras": 8, "replicas": 4}. Host and port are the config file's http_options."""
    from loraplex.ray.cli import resolve_args
    from loraplex.server.cli import build_parser

    argv = flags_to_argv(config)
    try:
        args = build_parser().parse_args(["serve-ray", *argv])
    except SystemExit:   # argparse has printed what was wrong
        raise ConfigError(f"invalid serve-ray flags in the application's args: {argv}") from None
    resolve_args(args)
    return build_ray_app(args)


def flags_to_argv(config: dict) -> list[str]:
    """{"model": M, "flag-name": value, ...} -> [M, "--flag-name", "value", ...]: true is a bare
    flag, false or null leaves it out, a list gives several values (objects as JSON)."""
    argv = [str(config["model"])] if config.get("model") is not None else []
    for key, value in config.items():
        if key == "model" or value is None or value is False:
            continue
        flag = "--" + key.replace("_", "-")
        if value is True:
            argv.append(flag)
        elif isinstance(value, list):
            argv += [flag, *(json.dumps(v) if isinstance(v, dict) else str(v) for v in value)]
        else:
            argv += [flag, str(value)]
    return argv


def replica_args(args: argparse.Namespace) -> argparse.Namespace:
    """The flags a replica starts its engine from: --demo is already resolved into MODEL and
    the environment, so the replica serves that path like any other."""
    resolved = copy.copy(args)
    resolved.demo = False
    return resolved
