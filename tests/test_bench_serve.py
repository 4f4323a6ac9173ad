"""`loraplex bench serve`'s workload: deterministic prompts and model mixes (the HTTP runs are in
tests/server/test_demo_server.py, against the demo server)."""

import collections
import random

import pytest

from loraplex.server.bench_serve import build_requests, model_sequence, request_body
from loraplex.server.bench_serve_args import BenchArgsError, resolve, saved_result_path
from loraplex.server.cli import build_parser


def parse(*argv):
    return resolve(build_parser().parse_args(["bench", "serve", *argv]))


def test_requests_are_reproducible_and_within_the_token_range():
    args = parse("--models", "base", "a", "b", "--num-prompts", "50", "--random-input-len", "7",
                 "--token-id-min", "10", "--token-id-max", "20", "--seed", "3")
    first, again = build_requests(args), build_requests(args)
    assert [(r.model, r.prompt) for r in first] == [(r.model, r.prompt) for r in again]
    assert all(len(r.prompt) == 7 and all(10 <= t < 20 for t in r.prompt) for r in first)
    other = build_requests(parse("--models", "base", "a", "b", "--num-prompts", "50", "--seed", "4"))
    assert [r.prompt for r in other] != [r.prompt for r in first]


def test_model_distributions():
    models = [f"m{i}" for i in range(8)]
    assert model_sequence(models, "round-robin", 10, random.Random(0), 1.0) == models + models[:2]
    counts = collections.Counter(model_sequence(models, "zipf", 20000, random.Random(0), 1.2))
    weights = [r ** -1.2 for r in range(1, 9)]
    for i, m in enumerate(models):          # frequencies follow rank^-s
        assert abs(counts[m] / 20000 - weights[i] / sum(weights)) < 0.015
    counts = collections.Counter(model_sequence(models, "uniform", 20000, random.Random(0), 1.0))
    assert max(counts.values()) - min(counts.values()) < 400


def test_text_prompts_and_prompts_file(tmp_path):
    args = parse("--model", "base", "--num-prompts", "3", "--prompt-format", "text", "--random-input-len", "5")
    assert all(isinstance(r.prompt, str) and len(r.prompt.split()) == 5 for r in build_requests(args))
    path = tmp_path / "prompts.txt"
    path.write_text("first prompt\n\nsecond\n")
    args = parse("--model", "base", "--num-prompts", "3", "--prompts-file", str(path))
    assert [r.prompt for r in build_requests(args)] == ["first prompt", "second", "first prompt"]


def test_random_range_ratio_varies_prompt_and_output_lengths():
    args = parse("--model", "base", "--num-prompts", "400", "--random-input-len", "20", "--random-output-len", "40",
                 "--random-range-ratio", "0.5", "--seed", "1")
    requests = build_requests(args)
    inputs, outputs = [len(r.prompt) for r in requests], [r.max_tokens for r in requests]
    assert min(inputs) == 10 and max(inputs) == 30 and min(outputs) == 20 and max(outputs) == 60
    assert len(set(outputs)) > 30
    assert [r.max_tokens for r in build_requests(args)] == outputs          # reproducible
    assert {r.max_tokens for r in build_requests(parse("--model", "base", "--random-output-len", "40"))} == {40}


def test_random_prefix_len_starts_every_prompt_alike():
    args = parse("--model", "base", "--num-prompts", "20", "--random-prefix-len", "30", "--random-input-len", "8")
    prompts = [r.prompt for r in build_requests(args)]
    assert all(len(p) == 38 and p[:30] == prompts[0][:30] for p in prompts)
    assert len({tuple(p[30:]) for p in prompts}) == 20                      # each its own end
    no_prefix = [r.prompt for r in build_requests(parse("--model", "base", "--num-prompts", "20",
                                                        "--random-input-len", "8"))]
    assert len({tuple(p[:8]) for p in no_prefix}) == 20                     # unchanged without it
    text = build_requests(parse("--model", "base", "--num-prompts", "3", "--prompt-format", "text",
                                "--random-prefix-len", "4", "--random-input-len", "2"))
    assert all(len(r.prompt.split()) == 6 and r.prompt.split()[:4] == text[0].prompt.split()[:4] for r in text)


def test_vllm_spellings_settle_into_ours(tmp_path):
    # A command written for `vllm bench serve` means the same here.
    args = parse("--host", "10.0.0.2", "--port", "9000", "--backend", "openai-chat", "--dataset-name", "random",
                 "--input-len", "7", "--output-len", "5", "--lora-modules", "a", "b", "--lora-assignment",
                 "round-robin", "--num-prompts", "4", "--metric-percentiles", "25,75", "--percentile-metrics",
                 "ttft,itl", "--goodput", "ttft:100", "tpot:20.5", "--served-model-name", "served",
                 "--top-p", "0.5", "--logprobs", "2", "--extra-body", '{"min_tokens": 3}', "--header", "x-a=1",
                 "--prompt-format", "text")
    assert (args.base_url, args.endpoint, args.model) == ("http://10.0.0.2:9000", "/v1/chat/completions", "served")
    assert [r.model for r in build_requests(args)] == ["a", "b", "a", "b"]
    assert {(len(r.prompt.split()), r.max_tokens) for r in build_requests(args)} == {(7, 5)}
    assert (args.percentile_values, args.percentile_names) == ([25.0, 75.0], ["ttft", "itl"])
    assert args.goodput_ms == {"ttft": 100.0, "tpot": 20.5} and args.headers == {"x-a": "1"}
    body = request_body(args, build_requests(args)[0])
    assert (body["top_p"], body["logprobs"], body["min_tokens"], body["messages"][0]["role"]) == (0.5, 2, 3, "user")
    defaults = parse("--model", "m")
    assert (defaults.base_url, defaults.endpoint, defaults.random_input_len) == ("http://127.0.0.1:8000",
                                                                                "/v1/completions", 128)
    assert "top_p" not in request_body(defaults, build_requests(defaults)[0])
    assert parse("--model", "m", "--port", "1234").base_url == "http://127.0.0.1:1234"
    random_pick = parse("--lora-modules", "a", "b", "--num-prompts", "40")
    assert {r.model for r in build_requests(random_pick)} == {"a", "b"} and random_pick.model_distribution == "uniform"


def test_save_result_names_its_file_as_vllm_does(tmp_path):
    args = parse("--model", "/models/llama-8b/", "--save-result", "--request-rate", "4", "--label", "run1")
    path = saved_result_path(args, args.model)
    assert path.startswith("./run1-4qps-llama-8b-") and path.endswith(".json")
    args = parse("--model", "m", "--save-result", "--result-dir", str(tmp_path), "--result-filename", "r.json")
    assert saved_result_path(args, "m") == str(tmp_path / "r.json")
    assert saved_result_path(parse("--model", "m"), "m") is None
    assert "/openai-infqps-m-" in saved_result_path(parse("--model", "m", "--save-result"), "m")


@pytest.mark.parametrize("argv,message", [
    (["--base-url", "http://a:1", "--host", "b"], "--base-url or --host/--port, not both"),
    (["--dataset-name", "sharegpt"], "--prompts-file"),
    (["--dataset-path", "x.json"], "--prompts-file"),
    (["--tokenizer", "meta-llama/Llama-3-8B"], "--token-id-max"),
    (["--trust-remote-code"], "no tokenizer or model code"),
    (["--models", "a", "--lora-modules", "b"], "give one"),
    (["--random-input-len", "8", "--input-len", "7"], "same setting"),
    (["--output-len", "0"], "must be positive"),
    (["--burstiness", "0", "--request-rate", "3"], "must be positive"),
    (["--num-warmups", "-1"], "must not be negative"),
    (["--percentile-metrics", "ttft,latency"], "unknown latency"),
    (["--metric-percentiles", "50,x"], "numbers separated by commas"),
    (["--metric-percentiles", "101"], r"within \[0, 100\]"),
    (["--goodput", "itl:5"], "unknown metric 'itl'"),
    (["--goodput", "ttft5"], "KEY:VALUE"),
    (["--goodput", "ttft:fast"], "a number of ms"),
    (["--header", "novalue"], "KEY=VALUE"),
    (["--extra-body", "[1, 2]"], "JSON object"),
    (["--result-filename", "r.json"], "add --save-result"),
    (["--random-range-ratio", "1"], r"in \[0, 1\)"),
])
def test_bad_flags_say_what_to_do(argv, message):
    with pytest.raises(BenchArgsError, match=message):
        parse("--model", "m", *argv)
