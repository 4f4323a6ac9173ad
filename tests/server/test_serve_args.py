"""`loraplex serve` argument handling, without starting an engine."""

import asyncio

import pytest

from loraplex.errors import ConfigError
from loraplex.server.app import build_app
from loraplex.server.backend import ServingBackend
from loraplex.server.cli import build_parser, main
from loraplex.server.lora_modules import LoRAModule, parse_lora_module
from loraplex.server.serve import engine_config_from_args
from loraplex.server.state import ServerState
from server.fake_engine import FakeEngine
from server.harness import ServerThread


def test_lora_modules_both_forms():
    assert parse_lora_module("sql=/a/b") == LoRAModule("sql", "/a/b")
    assert parse_lora_module('{"name": "chat", "path": "/c", "base_model_name": "base"}') == \
        LoRAModule("chat", "/c", "base")
    assert parse_lora_module('{"name": "moe", "path": "/m", "is_3d_lora_weight": true}') == \
        LoRAModule("moe", "/m", None, True)


@pytest.mark.parametrize("bad, message", [
    ("sql", "must be 'name=path'"), ("=/x", "must be 'name=path'"), ("{nope", "not valid JSON"),
    ('{"name": "x"}', "needs string keys"), ('{"name": "x", "path": "/p", "extra": 1}', "nothing else"),
    ('{"name": "x", "path": "/p", "base_model_name": 3}', "base_model_name must be a string"),
    ('{"name": "x", "path": "/p", "is_3d_lora_weight": "yes"}', "is_3d_lora_weight must be true or false"),
])
def test_bad_lora_modules_say_what_is_wrong(bad, message):
    with pytest.raises(ConfigError, match=message):
        parse_lora_module(bad)


def test_flags_reach_the_engine_config():
    args = build_parser().parse_args(
        ["serve", "/m", "--enable-lora", "--max-loras", "8", "--max-lora-rank", "64", "--max-cpu-loras", "32",
         "--dtype", "bfloat16", "--max-model-len", "512", "--gpu-memory-utilization", "0.5",
         "--max-num-seqs", "7", "--seed", "3", "--allow-pickle-lora-weights", "--port", "9000",
         "--max-logprobs", "-1", "--generation-config", "vllm", "--override-generation-config", '{"top_k": 5}',
         "--max-num-batched-tokens", "512", "--long-prefill-token-threshold", "64"])
    config = engine_config_from_args(args)
    assert (config.max_num_batched_tokens, config.long_prefill_token_threshold) == (512, 64)
    assert (config.max_loras, config.max_lora_rank, config.max_cpu_loras) == (8, 64, 32)
    assert (config.dtype, config.max_model_len, config.gpu_memory_utilization) == ("bfloat16", 512, 0.5)
    assert (config.max_num_seqs, config.seed, config.allow_pickle_lora_weights) == (7, 3, True)
    assert args.port == 9000
    assert (config.max_logprobs, config.generation_config, config.override_generation_config) == (-1, "vllm", {"top_k": 5})


def test_invalid_settings_exit_with_status_2(tmp_path, caplog):
    assert main(["serve", str(tmp_path), "--lora-modules", "a=/b"]) == 2
    assert "--lora-modules needs --enable-lora" in caplog.text
    assert main(["serve", str(tmp_path), "--max-cpu-loras", "1", "--max-loras", "4"]) == 2
    assert "max_cpu_loras (1) must be >= max_loras (4)" in caplog.text
    # A static adapter that is not there stops the start-up before the model loads.
    assert main(["serve", str(tmp_path), "--enable-lora", "--lora-modules", f"sql={tmp_path / 'nope'}"]) == 2
    assert f"--lora-modules sql={tmp_path / 'nope'}: adapter directory" in caplog.text
    assert "does not exist" in caplog.text and "is not a model checkpoint" not in caplog.text
    # So does a --generation-config directory without a generation_config.json.
    assert main(["serve", str(tmp_path), "--generation-config", str(tmp_path / "nope")]) == 2
    assert "is not a directory holding a generation_config.json" in caplog.text
    assert "is not a model checkpoint" not in caplog.text


@pytest.mark.parametrize("value", ["0", "-2", "two"])
def test_a_stream_interval_below_1_is_refused(value, capsys):
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(["serve", "/m", "--stream-interval", value])
    assert exit_info.value.code == 2
    assert f"--stream-interval: expected an integer >= 1, got '{value}'" in capsys.readouterr().err
    assert build_parser().parse_args(["serve", "/m", "--stream-interval", "4"]).stream_interval == 4


def test_a_broken_static_adapter_stops_the_start_up(tmp_path):
    def make_app():
        backend = ServingBackend(FakeEngine(), served_model_names=["base"], model_path="/m")
        backend.static_adapters.append(("bad", str(tmp_path / "missing"), None))
        return build_app(ServerState(backend))
    with pytest.raises(RuntimeError, match="failed to start"):
        ServerThread(make_app).start()
    backend = ServingBackend(FakeEngine(), served_model_names=["base"], model_path="/m")
    backend.static_adapters.append(("bad", str(tmp_path / "missing"), None))
    with pytest.raises(ConfigError, match=r"--lora-modules bad=\S+ could not be loaded: .* does not exist"):
        asyncio.run(backend.startup())


def test_static_adapters_load_together(tmp_path):
    # --lora-modules load at once, as a burst of first requests does: a slow load (here 0.2 s in
    # the engine) does not hold the others back, and every one is served by its name.
    import threading
    import time

    from adapters import write_peft_adapter

    class SlowEngine(FakeEngine):
        def __init__(self):
            super().__init__()
            self.lock, self.in_flight, self.most = threading.Lock(), 0, 0

        def add_lora(self, request):
            with self.lock:
                self.in_flight += 1
                self.most = max(self.most, self.in_flight)
            time.sleep(0.2)
            with self.lock:
                self.in_flight -= 1
            return super().add_lora(request)
    engine = SlowEngine()
    backend = ServingBackend(engine, served_model_names=["base"], model_path="/m")
    for i in range(4):
        backend.static_adapters.append((f"s{i}", str(write_peft_adapter(tmp_path / f"s{i}", rank=4, seed=i)), None))
    asyncio.run(backend.startup())
    assert engine.most > 1
    assert sorted(r.lora_name for r in engine.loras.values()) == ["s0", "s1", "s2", "s3"]


VLLM_COMMAND = ["--trust-remote-code", "--disable-log-requests", "--enable-prefix-caching", "--swap-space", "4",
                "--enable-chunked-prefill", "--max-log-len", "100", "--kv-cache-dtype", "auto", "-pp", "1",
                "--quantization", "None", "--api-server-count", "1", "-dp", "1"]


def test_a_vllm_command_line_is_accepted_with_each_flag_without_effect_logged(tmp_path, caplog):
    from loraplex.server.vllm_flags import check_vllm_flags

    args = build_parser().parse_args(["serve", str(tmp_path), *VLLM_COMMAND, "--tokenizer", str(tmp_path)])
    with caplog.at_level("INFO", logger="loraplex.server"):
        check_vllm_flags(args)
    assert "--trust-remote-code has no effect in loraplex: loraplex runs its own model code" in caplog.text
    assert "--disable-log-requests/--enable-log-requests has no effect" in caplog.text
    assert engine_config_from_args(args).enable_prefix_caching      # implemented: reaches the engine
    assert "--swap-space has no effect" in caplog.text and "--kv-cache-dtype" not in caplog.text


@pytest.mark.parametrize("flags, message", [
    (["--quantization", "awq"], "--quantization awq is not supported by loraplex: loraplex serves unquantized"),
    (["-q", "fp8"], "--quantization fp8 is not supported"),
    (["--kv-cache-dtype", "fp8"], "--kv-cache-dtype fp8 is not supported by loraplex: the KV cache holds"),
    (["--pipeline-parallel-size", "2"], "split a model with --tensor-parallel-size"),
    (["--tokenizer", "/elsewhere"], "the tokenizer is read from MODEL's directory"),
    (["--enable-auto-tool-choice"], "--enable-auto-tool-choice is not supported"),
    (["--tool-call-parser", "hermes"], "tool calls and reasoning are not parsed"),
    (["--api-server-count", "4"], "--api-server-count 4 is not supported by loraplex: one API server process"),
    (["-dp", "2"], "run several with `loraplex serve-ray --replicas N`"),
    (["--chat-template", "no-such-file"], "is neither a file nor a template"),
    (["--chat-template", "{% if %}"], "is not a valid Jinja template"),
])
def test_refused_vllm_flags_stop_the_start_up_saying_why(tmp_path, caplog, flags, message):
    assert main(["serve", str(tmp_path), *VLLM_COMMAND, *flags]) == 2
    assert message in caplog.text


def test_the_flag_tables_in_the_docs_follow_the_inventory():
    from pathlib import Path

    from loraplex.server.vllm_flags import REFUSED, WITHOUT_EFFECT
    doc = (Path(__file__).resolve().parents[2] / "docs" / "server.md").read_text()
    rows = {line.split(" | ")[0]: line for line in doc.splitlines() if line.startswith("| `-")}
    for flags, kind in ((WITHOUT_EFFECT, "accepted, no effect"), (REFUSED, "refused")):
        for flag in flags:
            row = rows["| " + ", ".join(f"`{n}`" for n in flag.names)]
            assert f" | {kind}" in row, row


def test_a_config_file_gives_flags_and_the_command_line_wins(tmp_path):
    """vLLM's --config: a YAML file of long flag names (dashes or underscores) and `model`;
    the command line's flags and MODEL take precedence, then the file, then the defaults."""
    from loraplex.server.cli import command_parser
    from loraplex.server.config_file import expand_config_file

    path = tmp_path / "serve.yaml"
    path.write_text("model: /from/file\nmax-model-len: 4096\nmax_num_seqs: 7\nenable-lora: true\n"
                    "enable-prefix-caching: false\nasync_scheduling: false\nport: 9001\n"
                    "lora-modules: [a=/adapters/a, {name: b, path: /adapters/b}]\n"
                    "override-generation-config: {temperature: 0.5}\nserved-model-name: [base, alias]\n")

    def parsed(*argv):
        return build_parser().parse_args(["serve", *expand_config_file(list(argv), command_parser("serve"))])
    args = parsed("--config", str(path))
    config = engine_config_from_args(args)
    assert (args.model, config.max_model_len, config.max_num_seqs, args.port) == ("/from/file", 4096, 7, 9001)
    assert config.enable_lora and not config.enable_prefix_caching and not config.async_scheduling
    assert args.lora_modules == ["a=/adapters/a", '{"name": "b", "path": "/adapters/b"}']
    assert config.override_generation_config == {"temperature": 0.5} and args.served_model_name == ["base", "alias"]
    args = parsed("/from/cli", f"--config={path}", "--max-model-len", "256", "--enable-prefix-caching")
    config = engine_config_from_args(args)
    assert (args.model, config.max_model_len, config.enable_prefix_caching) == ("/from/cli", 256, True)
    assert parsed("/m").config is None and parsed("/m").max_num_seqs == 256     # no file: nothing changes


@pytest.mark.parametrize("text, message", [
    ("max-model-lenn: 5", "'max-model-lenn' is not a flag of this command"),
    ("enable-lora: 3", "enable-lora is a switch: give it true or false"),
    ("- max-model-len", "must map flag names to values"),
    ("a: [", "is not valid YAML"),
])
def test_a_bad_config_file_stops_the_start_up_saying_what(tmp_path, capsys, text, message):
    path = tmp_path / "serve.yaml"
    path.write_text(text)
    assert main(["serve", "--config", str(path)]) == 2
    assert message in capsys.readouterr().err
    assert main(["serve", "--config", str(tmp_path / "nope.yaml")]) == 2
    assert "No such file or directory" in capsys.readouterr().err
