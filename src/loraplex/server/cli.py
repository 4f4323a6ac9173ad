"""The `loraplex` command. Each subcommand is a parser plus a function taking the
parsed args and returning the exit status."""

from __future__ import annotations

import argparse
import sys

from loraplex.logs import configure_logging


def cmd_plugins(args: argparse.Namespace) -> int:
    from loraplex.plugins.loader import load_plugins, missing_plugins, resolver_order
    from loraplex.plugins.report import format_plugin_report, plugin_report_json

    records = load_plugins()
    report = plugin_report_json if args.json else format_plugin_report
    print(report(records, resolver_order(), missing_plugins()))
    failed = [r.name for r in records if r.error]
    return 1 if failed else 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="loraplex", description="Multi-LoRA LLM serving engine.")
    subcommands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    plugins = subcommands.add_parser(
        "plugins", help="list discovered plugins and the resolver chain",
        description="Load plugins as the server would (honouring VLLM_PLUGINS) and show each "
                    "plugin, whether it loaded, and the resolvers it registered, in chain order. "
                    "Exits with status 1 if a selected plugin failed to load.")
    plugins.add_argument("--json", action="store_true", help="print the report as JSON")
    plugins.set_defaults(func=cmd_plugins)

    from loraplex.server.serve import add_serve_arguments, cmd_serve
    serve = subcommands.add_parser(
        "serve", help="run the OpenAI-compatible HTTP server",
        description="Serve MODEL (and its LoRA adapters) over an OpenAI-compatible HTTP API. "
                    "See docs/server.md for every flag, endpoint, variable and metric.")
    add_serve_arguments(serve)
    serve.set_defaults(func=cmd_serve)

    bench = subcommands.add_parser("bench", help="benchmarks", description="Benchmarks.")
    benches = bench.add_subparsers(dest="bench", metavar="BENCHMARK", required=True)
    from loraplex.server.bench_serve import cmd_bench_serve
    from loraplex.server.bench_serve_args import add_bench_serve_arguments
    bench_serve = benches.add_parser(
        "serve", help="drive an OpenAI-compatible server and measure throughput and latency",
        description="Send requests to an OpenAI-compatible server (loraplex or any other) from this "
                    "process, at a fixed concurrency or a Poisson rate, over a mix of models, and report "
                    "request and token throughput, TTFT, TPOT, inter-token latency and failures. "
                    "See docs/server.md.")
    add_bench_serve_arguments(bench_serve)
    bench_serve.set_defaults(func=cmd_bench_serve)

    from loraplex.ray.cli import add_ray_arguments, cmd_serve_ray
    serve_ray = subcommands.add_parser(
        "serve-ray", help="run the OpenAI-compatible server over many replicas on Ray Serve",
        description="Serve MODEL like `loraplex serve`, from several engine replicas on a Ray "
                    "cluster (a local one unless --ray-address says otherwise), each request sent "
                    "to a replica that holds its adapter. Needs loraplex[ray]; see docs/scaling.md.")
    add_serve_arguments(serve_ray)
    add_ray_arguments(serve_ray)
    serve_ray.set_defaults(func=cmd_serve_ray)
    return parser


def command_parser(command: str) -> argparse.ArgumentParser:
    """The flags of `serve` or `serve-ray` alone (what --config files may set)."""
    from loraplex.ray.cli import add_ray_arguments
    from loraplex.server.serve import add_serve_arguments

    parser = argparse.ArgumentParser(prog=f"loraplex {command}", add_help=False)
    add_serve_arguments(parser)
    if command == "serve-ray":
        add_ray_arguments(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    from loraplex.server.config_file import COMMANDS, expand_config_file

    argv = list(sys.argv[1:] if argv is None else argv)
    configure_logging()
    vllm_only: list = []
    if argv and argv[0] in COMMANDS:
        from loraplex.errors import ConfigError
        from loraplex.server.vllm_flags import take_vllm_only_flags
        parser = command_parser(argv[0])
        try:
            argv = argv[:1] + expand_config_file(argv[1:], parser)
        except ConfigError as e:
            print(f"loraplex {argv[0]}: error: {e}", file=sys.stderr)
            return 2
        rest, vllm_only = take_vllm_only_flags(argv[1:], set(parser._option_string_actions))
        argv = argv[:1] + rest
    args = build_parser().parse_args(argv)
    args.vllm_only_flags = vllm_only          # judged with the other vLLM flags (check_vllm_flags)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
