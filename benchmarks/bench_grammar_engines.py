"""Which grammar engine computes structured outputs' token masks: a measurement on this CPU.

Candidates, each installed from PyPI (cp311, x86_64, no GPU needed): xgrammar, llguidance and
outlines-core. For each, on one tokenizer and one JSON schema:

    tokenizer   building the engine's view of the vocabulary (once per server)
    compile     turning the schema into the engine's grammar (once per distinct schema)
    mask        filling the next-token bitmask of 64 rows, each with its own matcher (every step)
    advance     feeding each row its sampled token (every step)

Each step, every row then takes a random token its mask allows (seeded), so the rows walk
through different states of the grammar (inside strings, between keys, numbers) as a batch of
real requests would; a row whose grammar is complete starts over. The figure that matters is
the mask time of a batch-64 step, the host's work per step for structured rows.

No real tokenizer can be downloaded here: the script trains a byte-level BPE (the kind Llama 3,
Qwen and GPT models use) of --vocab-size tokens on the Python standard library's sources, once,
into --cache. The mask cost grows with the vocabulary, so measure at the size you serve.

    .venv/bin/python benchmarks/bench_grammar_engines.py [--vocab-size 32000] [--batch 64] [--steps 64]
        [--threads 2] [--runs 5] [--engines xgrammar llguidance outlines-core]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import sysconfig
import time
from pathlib import Path

import torch

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer"},
        "active": {"type": "boolean"},
        "tags": {"type": "array", "items": {"type": "string"}},
        "address": {"type": "object",
                    "properties": {"city": {"type": "string"}, "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
                    "required": ["city", "zip"]},
        "score": {"type": "number"},
    },
    "required": ["name", "age", "tags", "address"],
}


def train_tokenizer(vocab_size: int, cache: Path) -> Path:
    """A byte-level BPE tokenizer.json trained on the standard library's sources (cached)."""
    path = cache / f"bpe-{vocab_size}.json"
    if path.is_file():
        return path
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    files = sorted(Path(sysconfig.get_paths()["stdlib"]).rglob("*.py"))
    tok.train_from_iterator((p.read_text(errors="ignore") for p in files), trainer)
    cache.mkdir(parents=True, exist_ok=True)
    tok.save(str(path))
    return path


def token_bytes(tokenizer_json: str) -> list[bytes]:
    """The bytes each token id stands for (byte-level BPE: map the symbols back to bytes)."""
    from tokenizers import Tokenizer
    tok = Tokenizer.from_str(tokenizer_json)
    # GPT-2's byte <-> printable symbol table, rebuilt: printable bytes map to themselves.
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    table, n = {}, 0
    for b in range(256):
        if b in printable:
            table[chr(b)] = b
        else:
            table[chr(256 + n)] = b
            n += 1
    out = []
    for i in range(tok.get_vocab_size()):
        piece = tok.id_to_token(i)
        if piece is None or piece.startswith("<|"):
            out.append(b"")
            continue
        out.append(bytes(table[c] for c in piece))
    return out


class Engine:
    name: str

    def pick(self, bitmask_row: torch.Tensor, vocab: int, rng: random.Random) -> int:
        bits = ((bitmask_row[:, None] >> torch.arange(32, dtype=torch.int32)) & 1).flatten()[:vocab]
        allowed = bits.nonzero().flatten().tolist()
        return rng.choice(allowed)


class XGrammar(Engine):
    name = "xgrammar"

    def __init__(self, tokenizer_json: str, vocab: int, eos: int, threads: int) -> None:
        import xgrammar as xgr
        self.xgr = xgr
        encoded = [json.loads(tokenizer_json)["model"]["vocab"]]
        inverse = {v: k for k, v in encoded[0].items()}
        self.info = xgr.TokenizerInfo([inverse.get(i, "") for i in range(vocab)], vocab_type=xgr.VocabType.BYTE_LEVEL,
                                      vocab_size=vocab, stop_token_ids=[eos])
        self.compiler = xgr.GrammarCompiler(self.info, max_threads=threads, cache_enabled=False)
        self.batch = xgr.BatchGrammarMatcher(max_threads=threads)

    def compile(self, schema: dict):
        return self.compiler.compile_json_schema(json.dumps(schema))

    def matchers(self, compiled, n: int):
        return [self.xgr.GrammarMatcher(compiled) for _ in range(n)]

    def fill(self, matchers, bitmask: torch.Tensor) -> None:
        self.batch.batch_fill_next_token_bitmask(matchers, bitmask)

    def advance(self, matchers, tokens: list[int]) -> None:
        for m, t in zip(matchers, tokens):
            if not m.accept_token(t):
                raise RuntimeError("xgrammar refused a token its mask allowed")
            if m.is_terminated():
                m.reset()


class LLGuidance(Engine):
    name = "llguidance"

    def __init__(self, tokenizer_json: str, vocab: int, eos: int, threads: int) -> None:
        import llguidance
        self.llg = llguidance
        self.tokenizer = llguidance.LLTokenizer(tokenizer_json, n_vocab=vocab, eos_token=eos)
        self.executor = llguidance.LLExecutor(num_threads=threads)

    def compile(self, schema: dict):
        grammar = self.llg.LLMatcher.grammar_from_json_schema(json.dumps(schema))
        self.llg.LLMatcher(self.tokenizer, grammar)      # what compiling costs: building a matcher
        return grammar

    def matchers(self, grammar, n: int):
        return [self.llg.LLMatcher(self.tokenizer, grammar) for _ in range(n)]

    def fill(self, matchers, bitmask: torch.Tensor) -> None:
        from llguidance.torch import fill_next_token_bitmask_par
        fill_next_token_bitmask_par(self.executor, [(m, i) for i, m in enumerate(matchers)], bitmask)

    def advance(self, matchers, tokens: list[int]) -> None:
        for m, t in zip(matchers, tokens):
            if not m.consume_token(t):
                raise RuntimeError(f"llguidance refused a token its mask allowed: {m.get_error()}")
            if m.is_stopped():
                m.reset()


class OutlinesCore(Engine):
    name = "outlines-core"

    def __init__(self, tokenizer_json: str, vocab: int, eos: int, threads: int) -> None:
        import outlines_core
        self.oc = outlines_core
        pieces: dict[bytes, list[int]] = {}
        for i, b in enumerate(token_bytes(tokenizer_json)):
            if b and i != eos:
                pieces.setdefault(b, []).append(i)
        self.vocabulary = outlines_core.Vocabulary(eos, pieces)

    def compile(self, schema: dict):
        from outlines_core.json_schema import build_regex_from_schema
        return self.oc.Index(build_regex_from_schema(json.dumps(schema)), self.vocabulary)

    def matchers(self, index, n: int):
        return [self.oc.Guide(index) for _ in range(n)]

    def fill(self, guides, bitmask: torch.Tensor) -> None:
        for i, g in enumerate(guides):
            row = bitmask[i]
            g.write_mask_into(row.data_ptr(), row.numel(), row.element_size())

    def advance(self, guides, tokens: list[int]) -> None:
        for g, t in zip(guides, tokens):
            g.advance(t)
            if g.is_finished():
                g.reset()


ENGINES = {"xgrammar": XGrammar, "llguidance": LLGuidance, "outlines-core": OutlinesCore}


def run(engine_name: str, tokenizer_json: str, vocab: int, eos: int, args) -> dict:
    t0 = time.perf_counter()
    engine = ENGINES[engine_name](tokenizer_json, vocab, eos, args.threads)
    tokenizer_s = time.perf_counter() - t0
    compile_s = []
    for _ in range(args.runs):
        t0 = time.perf_counter()
        compiled = engine.compile(SCHEMA)
        compile_s.append(time.perf_counter() - t0)
    words = (vocab + 31) // 32
    mask_ms, advance_ms = [], []
    for run_index in range(args.runs):
        rng = random.Random(run_index)
        matchers = engine.matchers(compiled, args.batch)
        bitmask = torch.zeros(args.batch, words, dtype=torch.int32)
        for _ in range(args.steps):
            bitmask.fill_(0)
            t0 = time.perf_counter()
            engine.fill(matchers, bitmask)
            mask_ms.append((time.perf_counter() - t0) * 1e3)
            tokens = [engine.pick(bitmask[i], vocab, rng) for i in range(args.batch)]
            t0 = time.perf_counter()
            engine.advance(matchers, tokens)
            advance_ms.append((time.perf_counter() - t0) * 1e3)
    q = statistics.quantiles(mask_ms, n=10)
    return {"engine": engine_name, "tokenizer_s": round(tokenizer_s, 3),
            "compile_ms_median": round(statistics.median(compile_s) * 1e3, 2),
            "mask_ms_per_step_median": round(statistics.median(mask_ms), 3),
            "mask_ms_per_step_p10": round(q[0], 3), "mask_ms_per_step_p90": round(q[-1], 3),
            "mask_us_per_row_median": round(statistics.median(mask_ms) * 1e3 / args.batch, 1),
            "advance_ms_per_step_median": round(statistics.median(advance_ms), 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vocab-size", type=int, default=32000)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--cache", type=Path, default=Path("/tmp/loraplex-bench-tokenizers"))
    parser.add_argument("--engines", nargs="+", default=list(ENGINES), choices=list(ENGINES))
    args = parser.parse_args()
    tokenizer_json = train_tokenizer(args.vocab_size, args.cache).read_text()
    from tokenizers import Tokenizer
    tok = Tokenizer.from_str(tokenizer_json)
    vocab, eos = tok.get_vocab_size(), tok.token_to_id("<|endoftext|>")
    torch.set_num_threads(1)
    print(f"vocab {vocab}, batch {args.batch}, {args.steps} steps x {args.runs} runs, {args.threads} threads",
          file=sys.stderr)
    for name in args.engines:
        print(json.dumps(run(name, tokenizer_json, vocab, eos, args)))


if __name__ == "__main__":
    main()
