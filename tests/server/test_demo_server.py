"""`loraplex serve --demo` as the README runs it: a subprocess serving the shipped model, with
the shipped adapters resolved by the filesystem resolver on their first request, each doing
its task on held-out inputs, alone and in a batch mixed with the others."""

import asyncio
import contextlib
import io
import os
import re
import time
from pathlib import Path

import httpx
import openai
import pytest

from loraplex.demo import DEMO_ADAPTER_NAMES, demo_adapters_dir, demo_model_path, format_prompt
from loraplex.demo.tasks import held_out_pairs
from loraplex.errors import ConfigError
from loraplex.server.cli import build_parser
from loraplex.server.demo_mode import DEMO_SERVED_NAME, apply_demo_args, demo_environment
from server.serve_process import ServeProcess

NUM_HELD_OUT = 20
BASE_TASK = "echo"   # what the base model does; each adapter's task is its name


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """The server, plus /v1/models as it was before any request named an adapter."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VLLM_", "LORAPLEX_"))}
    log_path = tmp_path_factory.mktemp("demo") / "server.log"
    server = ServeProcess(["--demo", "--device", "cpu"], env, log_path)   # no --host: --demo picks it
    try:
        server.wait_ready()
        before = httpx.get(server.base_url + "/v1/models").json()["data"]
        yield {"server": server, "models_before": before}
    finally:
        server.stop()


def listening_addresses(port: int) -> set[str]:
    """The local addresses of the sockets listening on `port` (IPv4 and IPv6), from /proc/net."""
    addresses = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(FileNotFoundError):
            for line in Path(table).read_text().splitlines()[1:]:
                local, state = line.split()[1], line.split()[3]
                address, hex_port = local.split(":")
                if state == "0A" and int(hex_port, 16) == port:   # 0A: LISTEN
                    addresses.add(address)
    return addresses


def test_demo_listens_on_this_machine_only(demo):
    """Runtime adapter loading is on, so without --host the demo takes 127.0.0.1 alone: no
    IPv4 or IPv6 wildcard (the log once said 127.0.0.1 while uvicorn took every interface)."""
    server = demo["server"]
    assert listening_addresses(server.port) == {"0100007F"}   # 127.0.0.1, little-endian hex
    assert "listening on http://127.0.0.1:" in server.log_path.read_text()


def client(server) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=server.base_url + "/v1", api_key="unused", max_retries=0)


def max_tokens_for(pairs) -> int:
    # Byte-level tokenizer: one token per byte, plus EOS and a little slack.
    return max(len(answer.encode()) for _, answer in pairs) + 4


async def complete_batch(server, model: str, pairs) -> list[str]:
    """One /v1/completions call with every input of `pairs` as a batch of prompts."""
    async with client(server) as c:
        out = await c.completions.create(model=model, prompt=[format_prompt(text) for text, _ in pairs],
                                         max_tokens=max_tokens_for(pairs), temperature=0)
    return [choice.text for choice in sorted(out.choices, key=lambda ch: ch.index)]


def accuracy(texts, pairs) -> float:
    return sum(text == answer for text, (_, answer) in zip(texts, pairs, strict=True)) / len(pairs)


@pytest.fixture(scope="module")
def solo_answers(demo):
    """{(model, task): answers}: each model on each task's held-out inputs, one batch per call.
    The adapters' first requests happen here, one adapter at a time."""
    server = demo["server"]
    answers = {}
    for model in (DEMO_SERVED_NAME, *DEMO_ADAPTER_NAMES):
        tasks = (BASE_TASK, *DEMO_ADAPTER_NAMES) if model == DEMO_SERVED_NAME else (model,)
        for task in tasks:
            pairs = held_out_pairs(task, NUM_HELD_OUT)
            answers[model, task] = asyncio.run(complete_batch(server, model, pairs))
    return answers


def test_demo_serves_the_shipped_model_and_nothing_else_yet(demo):
    assert [(m["id"], m["root"], m["parent"]) for m in demo["models_before"]] == \
        [(DEMO_SERVED_NAME, str(demo_model_path()), None)]
    log = demo["server"].log_path.read_text()
    for expected in (f"--demo: VLLM_LORA_RESOLVER_CACHE_DIR={demo_adapters_dir()}",
                     "--demo: VLLM_PLUGINS=lora_filesystem_resolver",
                     f"serving model {demo_model_path()} as {DEMO_SERVED_NAME}",
                     f"listening on http://127.0.0.1:{demo['server'].port}",
                     "resolver chain, in order: lora_filesystem_resolver; resolution on first request: on"):
        assert expected in log, expected


def test_each_adapter_does_its_task_on_held_out_inputs(solo_answers):
    for task in DEMO_ADAPTER_NAMES:
        score = accuracy(solo_answers[task, task], held_out_pairs(task, NUM_HELD_OUT))
        assert score >= 0.9, f"adapter {task}: {score:.2f} exact on held-out inputs"


def test_base_model_echoes_and_does_none_of_the_adapter_tasks(solo_answers):
    assert accuracy(solo_answers[DEMO_SERVED_NAME, BASE_TASK], held_out_pairs(BASE_TASK, NUM_HELD_OUT)) >= 0.9
    for task in DEMO_ADAPTER_NAMES:
        score = accuracy(solo_answers[DEMO_SERVED_NAME, task], held_out_pairs(task, NUM_HELD_OUT))
        assert score < 0.5, f"base model on {task}: {score:.2f} exact"


def test_first_requests_were_resolved_by_the_filesystem_resolver(demo, solo_answers):
    models = {m["id"]: m for m in httpx.get(demo["server"].base_url + "/v1/models").json()["data"]}
    log = demo["server"].log_path.read_text()
    for name in DEMO_ADAPTER_NAMES:
        assert models[name]["root"] == str(demo_adapters_dir() / name)
        assert models[name]["parent"] == DEMO_SERVED_NAME
        resolved = f"INFO loraplex.resolvers.chain: LoRA adapter {name!r} resolved by 'lora_filesystem_resolver'"
        assert log.count(resolved) == 1, f"{resolved!r} not logged exactly once:\n{log}"


def test_mixed_concurrent_batch_keeps_each_rows_adapter(demo, solo_answers):
    """Base and every adapter at once, one request per row, fired together: each row gives
    what its own model gave for it alone (and so its own task's answer)."""
    num_per_model = 5
    rows = [(DEMO_SERVED_NAME, BASE_TASK)] + [(name, name) for name in DEMO_ADAPTER_NAMES]
    jobs = [(model, task, i) for i in range(num_per_model) for model, task in rows]   # interleaved

    async def fire():
        async with client(demo["server"]) as c:
            return await asyncio.gather(*[
                c.completions.create(model=model, prompt=format_prompt(held_out_pairs(task, NUM_HELD_OUT)[i][0]),
                                     max_tokens=max_tokens_for(held_out_pairs(task, NUM_HELD_OUT)), temperature=0)
                for model, task, i in jobs])

    outs = asyncio.run(fire())
    for (model, task, i), out in zip(jobs, outs, strict=True):
        text, answer = held_out_pairs(task, NUM_HELD_OUT)[i]
        assert out.model == model
        assert out.choices[0].text == solo_answers[model, task][i], (model, text)
    for model, task in rows:
        mixed = [out.choices[0].text for (m, _, _), out in zip(jobs, outs) if m == model]
        assert accuracy(mixed, held_out_pairs(task, num_per_model)) >= 0.8, (model, mixed)


README = Path(__file__).resolve().parents[2] / "README.md"


def readme_demo_blocks() -> list[tuple[str, str]]:
    """The code blocks of the README's demo section, as (language, text); output blocks have none."""
    section = README.read_text().split("## Try it: the embedded demo", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```(\w*)\n(.*?)```", section, flags=re.DOTALL)


def readme_block(marker: str) -> str:
    return next(text for _, text in readme_demo_blocks() if marker in text)


def readme_output_after(marker: str) -> str:
    """The output block that follows the README's first code block containing `marker`."""
    blocks = readme_demo_blocks()
    start = next(i for i, (_, text) in enumerate(blocks) if marker in text)
    return next(text for language, text in blocks[start + 1:] if not language)


def test_readme_requests_print_what_the_readme_says(demo, solo_answers):
    """The README's requests, sent to the running demo, print the README's outputs.
    (The same requests as the README's curl commands, sent with httpx: the test needs no curl.)"""
    url = demo["server"].base_url
    newcomer_input = "The Quick brown fox, 42 times!"      # what the README's loop sends
    assert f'"content": "{newcomer_input}"' in readme_block("/v1/chat/completions")
    chat = [f"{model} -> " + httpx.post(url + "/v1/chat/completions", timeout=60, json={
        "model": model, "messages": [{"role": "user", "content": newcomer_input}], "max_tokens": 60,
        "temperature": 0}).json()["choices"][0]["message"]["content"] + "\n"
        for model in (DEMO_SERVED_NAME, *DEMO_ADAPTER_NAMES)]
    assert "".join(chat) == readme_output_after("/v1/chat/completions")

    models = httpx.get(url + "/v1/models").json()["data"]
    assert "".join(f"{m['id']} parent: {m['parent']}\n" for m in models) == readme_output_after("/v1/models")

    choices = httpx.post(url + "/v1/completions", timeout=60, json={
        "model": "reverse", "prompt": ["Input: lora rocks\nOutput: ", "Input: serve many\nOutput: "],
        "max_tokens": 20, "temperature": 0}).json()["choices"]
    assert "".join(c["text"] + "\n" for c in choices) == readme_output_after("/v1/completions")

    assert '"input": "lora rocks"' in readme_block("/v1/responses")
    answer = httpx.post(url + "/v1/responses", timeout=60, json={
        "model": "upper", "input": "lora rocks", "max_output_tokens": 20, "temperature": 0}).json()
    assert answer["output"][0]["content"][0]["text"] + "\n" == readme_output_after("/v1/responses")


def test_readme_openai_example_prints_what_the_readme_says(demo, solo_answers):
    example = readme_block("AsyncOpenAI").replace("http://localhost:8000", demo["server"].base_url)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(example, "README.md", "exec"), {"__name__": "readme_example"})   # verbatim but the port
    assert printed.getvalue() == readme_output_after("AsyncOpenAI")


def test_readme_log_lines_are_in_the_servers_log(demo, solo_answers):
    log = demo["server"].log_path.read_text()
    stamp = r"\d\d-\d\d \d\d:\d\d:\d\d\.\d{3} "           # logs.py's time, other in every run
    for line in readme_block("loraplex.resolvers.chain: LoRA adapter").splitlines():
        assert re.match(stamp, line), f"the README's log line {line!r} has no time"
        pattern = "^" + stamp + re.escape(re.sub("^" + stamp, "", line)).replace(re.escape("..."), ".*")
        assert re.search(pattern, log, re.MULTILINE), f"{line!r} not in:\n{log}"


def parse_serve(*argv: str):
    return build_parser().parse_args(["serve", *argv])


def test_demo_flags_fill_in_model_name_lora_and_environment():
    args, environ = parse_serve("--demo"), {"VLLM_PLUGINS": "lora_filesystem_resolver,my_plugin"}
    apply_demo_args(args, environ)
    assert args.model == str(demo_model_path()) and args.served_model_name == [DEMO_SERVED_NAME]
    assert args.enable_lora and args.host == "127.0.0.1"   # runtime loading on: this machine only
    assert environ["VLLM_PLUGINS"] == "lora_filesystem_resolver,my_plugin"   # the user's value stays
    assert environ["VLLM_LORA_RESOLVER_CACHE_DIR"] == demo_environment()["VLLM_LORA_RESOLVER_CACHE_DIR"]
    assert environ["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "True"
    args = parse_serve("--demo", "--served-model-name", "tiny", "--host", "0.0.0.0")
    apply_demo_args(args, {})
    assert args.served_model_name == ["tiny"] and args.host == "0.0.0.0"


def test_demo_warns_when_a_kept_variable_hides_its_adapters(caplog, tmp_path):
    """A vLLM user's own VLLM_PLUGINS or cache dir stays, but the log says the demo adapters
    will then not resolve; values that still reach them are only noted."""
    demo_dir = demo_environment()["VLLM_LORA_RESOLVER_CACHE_DIR"]
    hiding = {"VLLM_PLUGINS": "lora_s3_resolver", "VLLM_LORA_RESOLVER_CACHE_DIR": str(tmp_path)}
    with caplog.at_level("INFO", logger="loraplex.server"):
        apply_demo_args(parse_serve("--demo"), dict(hiding))
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert warnings == [f"--demo: keeping {key}={value} from the environment, so the demo adapters in "
                        f"{demo_dir} will not resolve; unset it to serve them" for key, value in hiding.items()]
    caplog.clear()
    reaching = {"VLLM_PLUGINS": " my_plugin , lora_filesystem_resolver", "VLLM_LORA_RESOLVER_CACHE_DIR": demo_dir + "/"}
    with caplog.at_level("INFO", logger="loraplex.server"):
        apply_demo_args(parse_serve("--demo"), dict(reaching))
    assert [r.levelname for r in caplog.records if "keeping" in r.getMessage()] == ["INFO", "INFO"]


def test_demo_refuses_a_model_and_serve_without_demo_needs_one():
    with pytest.raises(ConfigError, match="leave out MODEL"):
        apply_demo_args(parse_serve("/models/base", "--demo"), {})
    with pytest.raises(ConfigError, match="needs MODEL"):
        apply_demo_args(parse_serve(), {})
    environ, args = {}, parse_serve("/models/base")
    apply_demo_args(args, environ)
    assert environ == {} and args.host == "0.0.0.0"


def run_bench(server, tmp_path, *argv) -> dict:
    """`loraplex bench serve` as a user runs it, in its own process, against the demo server."""
    import json
    import subprocess
    import sys
    result_file = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, "-m", "loraplex.server.cli", "bench", "serve",
                           "--base-url", server.base_url, "--result-file", str(result_file), "--disable-tqdm",
                           *argv], capture_output=True, text=True, timeout=300)
    assert "Serving benchmark result" in proc.stdout, proc.stdout + proc.stderr
    return {"code": proc.returncode, "stdout": proc.stdout, **json.loads(result_file.read_text())}


def test_bench_serve_counts_requests_tokens_and_models(demo, tmp_path):
    models = [DEMO_SERVED_NAME, *DEMO_ADAPTER_NAMES]
    out = run_bench(demo["server"], tmp_path, "--models", *models, "--model-distribution", "round-robin",
                    "--num-prompts", "24", "--max-concurrency", "8", "--random-input-len", "12",
                    "--random-output-len", "8", "--ignore-eos")
    assert out["code"] == 0 and (out["completed"], out["failed"]) == (24, 0)
    assert out["total_output_tokens"] == 24 * 8 and out["total_input_tokens"] == 24 * 12
    assert out["per_model"] == {m: {"requests": 6, "completed": 6, "failed": 0, "output_tokens": 48} for m in models}
    assert 0 < out["median_ttft_ms"] <= out["p99_ttft_ms"] < out["p99_e2el_ms"]
    assert 0 < out["median_itl_ms"] and 0 < out["median_tpot_ms"]
    assert out["output_throughput"] == pytest.approx(24 * 8 / out["duration"])
    assert "Output token throughput (tok/s):" in out["stdout"]


def test_bench_serve_poisson_text_chat_and_failures(demo, tmp_path):
    out = run_bench(demo["server"], tmp_path, "--models", "upper", "no-such-adapter", "--model-distribution",
                    "round-robin", "--num-prompts", "6", "--request-rate", "20", "--prompt-format", "text",
                    "--endpoint", "/v1/chat/completions", "--random-input-len", "3", "--random-output-len", "4",
                    "--ignore-eos", "--save-detailed")
    assert (out["completed"], out["failed"]) == (3, 3) and out["code"] == 0
    assert out["per_model"]["no-such-adapter"] == {"requests": 3, "completed": 0, "failed": 3, "output_tokens": 0}
    assert out["per_model"]["upper"]["output_tokens"] == 12
    assert any("404" in e and "does not exist" in e for e in out["errors"]), out["errors"]
    assert len(out["requests"]) == 6 and out["request_rate"] == 20
    sent = [r["sent_at"] for r in sorted(out["requests"], key=lambda r: r["index"])]   # wall clock, in order
    assert sent == sorted(sent) and time.time() - 120 < sent[0] < sent[-1] <= time.time()


def test_bench_serve_takes_a_vllm_bench_command(demo, tmp_path):
    # `vllm bench serve` spellings, as a vLLM user's script passes them: host and port, the random
    # dataset's general lengths, LoRA modules round robin, bursty arrivals, warm-ups, goodput, and
    # the result saved under --result-dir/--result-filename; no --model: the server's first model.
    import json
    import subprocess
    import sys
    server = demo["server"]
    proc = subprocess.run([sys.executable, "-m", "loraplex.server.cli", "bench", "serve", "--host", "127.0.0.1",
                           "--port", str(server.port), "--backend", "openai", "--dataset-name", "random",
                           "--input-len", "12", "--output-len", "6", "--lora-modules", *DEMO_ADAPTER_NAMES[:2],
                           "--lora-assignment", "round-robin", "--num-prompts", "8", "--max-concurrency", "4",
                           "--request-rate", "50", "--burstiness", "0.5", "--num-warmups", "2", "--ignore-eos",
                           "--goodput", "ttft:60000", "e2el:60000", "--metric-percentiles", "50,99",
                           "--percentile-metrics", "ttft,itl", "--save-result", "--result-dir", str(tmp_path),
                           "--result-filename", "vllm.json", "--metadata", "run=1", "--request-id-prefix", "vb-",
                           "--header", "X-Secret=s3cret", "--api-key", "k3y", "--ready-check-timeout-sec", "30",
                           "--disable-tqdm"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = json.loads((tmp_path / "vllm.json").read_text())
    assert (out["completed"], out["failed"], out["total_output_tokens"]) == (8, 0, 48)
    assert out["per_model"] == {name: {"requests": 4, "completed": 4, "failed": 0, "output_tokens": 24}
                                for name in DEMO_ADAPTER_NAMES[:2]}
    assert out["request_goodput"] == pytest.approx(out["request_throughput"])     # objectives every request meets
    assert {"p50_ttft_ms", "p99_ttft_ms", "p50_itl_ms", "p99_itl_ms"} <= set(out) and "p99_tpot_ms" not in out
    assert out["run"] == "1" and out["total_input_tokens"] == 8 * 12
    saved = (tmp_path / "vllm.json").read_text()
    assert "s3cret" not in saved and "k3y" not in saved and out["args"]["num_warmups"] == 2
    assert "Request goodput (req/s):" in proc.stdout and "P50 ITL (ms):" in proc.stdout
    strict = subprocess.run([sys.executable, "-m", "loraplex.server.cli", "bench", "serve", "--port", str(server.port),
                             "--num-prompts", "3", "--input-len", "4", "--output-len", "3", "--ignore-eos",
                             "--goodput", "e2el:0.001", "--result-file", str(tmp_path / "base.json"),
                             "--disable-tqdm"], capture_output=True, text=True, timeout=300)
    base = json.loads((tmp_path / "base.json").read_text())
    assert strict.returncode == 0 and list(base["per_model"]) == [DEMO_SERVED_NAME], strict.stdout + strict.stderr
    assert base["completed"] == 3 and base["request_goodput"] == 0
    refused = subprocess.run([sys.executable, "-m", "loraplex.server.cli", "bench", "serve", "--port", str(server.port),
                              "--dataset-name", "sharegpt", "--dataset-path", "x.json"], capture_output=True, text=True)
    assert refused.returncode == 2 and "--prompts-file" in refused.stderr
    import socket
    with socket.socket() as s:                        # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        closed_port = s.getsockname()[1]
    started = time.monotonic()
    down = subprocess.run([sys.executable, "-m", "loraplex.server.cli", "bench", "serve", "--port", str(closed_port),
                           "--model", "m", "--ready-check-timeout-sec", "2"], capture_output=True, text=True,
                          timeout=60)
    assert down.returncode == 2 and "did not answer 200 within 2 s" in down.stderr, down.stderr
    assert 2 <= time.monotonic() - started < 30
