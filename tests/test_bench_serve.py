"""`loraplex bench serve`'s workload: deterministic prompts and model mixes (the HTTP runs are in
tests/server/test_demo_server.py, against the demo server)."""

import collections
import random

from loraplex.server.bench_serve import build_requests, model_sequence
from loraplex.server.cli import build_parser


def parse(*argv):
    return build_parser().parse_args(["bench", "serve", *argv])


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
