"""`--config FILE` (vLLM's): `serve` and `serve-ray` flags from a YAML file.

The file maps long flag names (`max-model-len`, or `max_model_len`) to values, and `model`
to the base model. Its flags go before the command line's, so the command line wins (argparse
keeps a flag's last value) and a MODEL given on the command line replaces the file's, as in
vLLM: command line, then the file, then the defaults. true turns a switch on; false turns
it off (its --no- form) or leaves it off; a list gives the flag's values one by one; a mapping
is passed as JSON (the JSON-valued flags).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from loraplex.errors import ConfigError

COMMANDS = ("serve", "serve-ray")


def expand_config_file(argv: list[str], command_parser: argparse.ArgumentParser) -> list[str]:
    """argv (after the command's name) with `--config FILE` replaced by the file's flags."""
    path, rest = _take_config_flag(argv)
    if path is None:
        return argv
    config = _read(path)
    options = command_parser._option_string_actions      # flag name -> action
    model = config.pop("model", None)
    flags: list[str] = []
    for key, value in config.items():
        flag = "--" + str(key).replace("_", "-")
        action = options.get(flag)
        if action is None or flag == "--config":
            raise ConfigError(f"--config {path}: {key!r} is not a flag of this command; the file takes "
                              f"the long names of the command's flags (see --help)")
        flags += _flag_values(flag, value, action, options, path)
    # MODEL goes first, before any flag of several values could take it for one of its own:
    # the command line's if it has one, else the file's.
    cli_model, rest = _take_model(rest, command_parser)
    model = cli_model if cli_model is not None else model
    return ([str(model)] if model is not None else []) + flags + rest


def _take_model(argv: list[str], command_parser: argparse.ArgumentParser) -> tuple[str | None, list[str]]:
    """The command line's MODEL and the command line without it."""
    parsed = vars(command_parser.parse_known_args(argv)[0])
    if parsed["model"] is None:
        return None, argv
    for i, arg in enumerate(argv):
        without = argv[:i] + argv[i + 1:]
        if arg == parsed["model"] and vars(command_parser.parse_known_args(without)[0]) == {**parsed, "model": None}:
            return arg, without
    return None, argv   # not found as a token of its own: leave the command line as it is


def _take_config_flag(argv: list[str]) -> tuple[str | None, list[str]]:
    for i, arg in enumerate(argv):
        if arg == "--config":
            if i + 1 == len(argv):
                raise ConfigError("--config needs a YAML file")
            return argv[i + 1], argv[:i] + argv[i + 2:]
        if arg.startswith("--config="):
            return arg.split("=", 1)[1], argv[:i] + argv[i + 1:]
    return None, argv


def _read(path: str) -> dict:
    import yaml

    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"--config {path}: {e.strerror}") from None
    try:
        config = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"--config {path} is not valid YAML: {e}") from None
    if config is None:
        return {}
    if not isinstance(config, dict):
        raise ConfigError(f"--config {path} must map flag names to values (e.g. `max-model-len: 4096`), "
                          f"got a {type(config).__name__}")
    return config


def _flag_values(flag: str, value, action: argparse.Action, options: dict, path: str) -> list[str]:
    takes_values = action.nargs != 0
    if isinstance(value, bool):
        if not takes_values:
            if value:
                return [flag]
            negative = "--no-" + flag[2:]
            return [negative] if negative in options else []
        value = str(value).lower()
    elif not takes_values:
        raise ConfigError(f"--config {path}: {flag[2:]} is a switch: give it true or false, not {value!r}")
    if value is None:
        return []
    if isinstance(value, list):
        return [flag] + [json.dumps(v) if isinstance(v, dict) else str(v) for v in value]
    return [flag, json.dumps(value) if isinstance(value, dict) else str(value)]
