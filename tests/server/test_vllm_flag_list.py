"""Every option of `vllm serve` (vLLM 0.34.0, server/vllm_flag_list.py) gets an answer from
`loraplex serve`: parsed as loraplex's own, or accepted at vLLM's default (a switch: off), or
refused naming the flag and why; never argparse's bare "unrecognized arguments"."""

from __future__ import annotations

import json

import pytest

from loraplex.errors import ConfigError
from loraplex.server.cli import build_parser, command_parser, main
from loraplex.server.vllm_flag_list import VLLM_SERVE_FLAGS
from loraplex.server.vllm_flags import check_vllm_flags, check_vllm_only_flags, take_vllm_only_flags

KNOWN = set(command_parser("serve")._option_string_actions)
NOT_OURS = [row for row in VLLM_SERVE_FLAGS if not set(row[0]) & KNOWN]
UNSET = ("None", "(unset)", "", "[]", "{}")


def parse(*argv: str):
    """As `loraplex serve` parses a command line: vLLM-only flags lifted out first."""
    rest, found = take_vllm_only_flags(list(argv), KNOWN)
    args = build_parser().parse_args(["serve", "/m", *rest])
    args.vllm_only_flags = found
    return args


def at_default(row) -> list[list[str]]:
    """Command lines that ask for vLLM's default: a switch's off spellings (and its on spelling
    when vLLM's default is on), a value flag at its default value."""
    spellings, kind, default, _ = row
    if kind == "switch":
        return [[s] for s in spellings[1:]] + ([[spellings[0]]] if default == "True" else [])
    if default in UNSET:
        return []
    return [[spellings[0], *(json.loads(default) if kind == "values" and default.startswith("[") else [default])]]


def not_default(row) -> list[str] | None:
    spellings, kind, default, _ = row
    if kind == "switch":
        return None if default == "True" else [spellings[0]]
    return [spellings[0], "1234" if default != "1234" else "4321"]


def test_the_list_is_vllms_serve_options():
    names = {s for row in VLLM_SERVE_FLAGS for s in row[0]}
    assert len(VLLM_SERVE_FLAGS) == 327 and {"--max-model-len", "-tp", "--enable-sleep-mode", "--uds"} <= names
    assert all(kind in ("switch", "value", "values", "optional") for _, kind, _, _ in VLLM_SERVE_FLAGS)
    assert len(NOT_OURS) > 200                     # most are answered generically


@pytest.mark.parametrize("row", NOT_OURS, ids=lambda row: row[0][0])
def test_each_vllm_only_flag_is_accepted_at_its_default_and_refused_otherwise(row, caplog):
    for argv in at_default(row):
        args = parse(*argv)
        with caplog.at_level("INFO", logger="loraplex.server"):
            check_vllm_only_flags(args.vllm_only_flags)
        assert f"{' '.join(argv)} has no effect in loraplex" in caplog.text
    argv = not_default(row)
    if argv is not None:
        args = parse(*argv)
        with pytest.raises(ConfigError, match=f"vLLM flags loraplex does not implement: {' '.join(argv)} \\("):
            check_vllm_only_flags(args.vllm_only_flags)


def test_every_spelling_of_every_vllm_flag_parses():
    """No spelling is an argparse error (loraplex's own flags are given vLLM's default value)."""
    for spellings, kind, default, _ in VLLM_SERVE_FLAGS:
        for spelling in spellings:
            if spelling in KNOWN and kind != "switch" and default in UNSET:
                continue                           # loraplex's own flag, tested with its own values
            value = [] if kind == "switch" else [default if default not in UNSET else "7"]
            parse(spelling, *value)


def test_a_vllm_command_line_answers_every_flag_at_once(caplog):
    """Underscores, -O3, dotted JSON keys and suffixes as vLLM takes them; the flags loraplex
    refuses are named together, each with its reason."""
    args = parse("--max_model_len", "8K", "-O3", "--kv_cache_memory_bytes", "1G", "--no-enable-expert-parallel",
                 "--override-generation-config.temperature", "0.5", "--override-generation-config.top_k", "5",
                 "--scheduling-policy", "fcfs", "--disable-prefix-caching", "--device-memory-utilization", "0.5")
    assert (args.max_model_len, args.kv_cache_bytes, args.gpu_memory_utilization) == (8192, 2**30, 0.5)
    assert args.override_generation_config == {"temperature": 0.5, "top_k": 5} and not args.enable_prefix_caching
    with caplog.at_level("INFO", logger="loraplex.server"):
        check_vllm_flags(args)
    assert "--optimization-level has no effect" in caplog.text
    assert "--scheduling-policy fcfs has no effect in loraplex" in caplog.text
    args = parse("--enable-sleep-mode", "--scheduling-policy", "priority", "--kv-cache-dtype-skip-layers", "a", "b")
    with pytest.raises(ConfigError) as err:
        check_vllm_flags(args)
    assert str(err.value).startswith("vLLM flags loraplex does not implement: --enable-sleep-mode (loraplex has "
                                     "no sleep mode (/sleep, /wake_up)); --scheduling-policy priority (loraplex "
                                     "schedules first come, first served")
    assert "--kv-cache-dtype-skip-layers a b (the KV cache is loraplex's own" in str(err.value)


def test_serve_refuses_them_before_the_model_loads(tmp_path, caplog):
    assert main(["serve", str(tmp_path), "--enable-sleep-mode", "--enable-eplb"]) == 2
    assert "--enable-sleep-mode (loraplex has no sleep mode" in caplog.text and "--enable-eplb (" in caplog.text
    assert "is not a model checkpoint" not in caplog.text
