"""Overlapped (async) scheduling gives the same outputs as lock-step scheduling, token for token.

The engine with async_scheduling=True launches step N+1 before it reads step N's tokens
(engine_core.py); these tests run the same requests both ways on the CPU (the same code
path as on a GPU) and compare everything a caller sees: greedy and seeded tokens, text,
finish and stop reasons with stop strings, stop token ids, EOS, max_tokens and
max_model_len, n > 1, logprobs, chunked prefill, preemption, and aborts.
"""

import pytest

from fake_runner import FakeRunner, ScriptedRunner, fake_engine, run_all
from loraplex import LLM, SamplingParams


def _llm(path, **config):
    return LLM(model=str(path), device="cpu", **config)


def _generate(path, prompts, params, **config):
    llm = _llm(path, **config)
    outs = llm.generate(prompts, params, use_tqdm=False)
    return outs, llm.llm_engine


def _same(a, b):
    """Every field a caller reads, with logprobs to float tolerance."""
    assert [o.request_id for o in a] == [o.request_id for o in b]
    for x, y in zip(a, b):
        assert x.prompt_token_ids == y.prompt_token_ids and x.finished and y.finished
        assert len(x.outputs) == len(y.outputs)
        for cx, cy in zip(x.outputs, y.outputs):
            assert (cx.index, cx.token_ids, cx.text, cx.finish_reason, cx.stop_reason) == \
                (cy.index, cy.token_ids, cy.text, cy.finish_reason, cy.stop_reason)
            assert (cx.logprobs is None) == (cy.logprobs is None)
            if cx.logprobs is not None:
                assert cx.cumulative_logprob == pytest.approx(cy.cumulative_logprob, abs=1e-4)
                for ex, ey in zip(cx.logprobs, cy.logprobs):
                    assert list(ex) == list(ey)
                    for t in ex:
                        assert (ex[t].rank, ex[t].decoded_token) == (ey[t].rank, ey[t].decoded_token)
                        assert ex[t].logprob == pytest.approx(ey[t].logprob, abs=1e-4)


PROMPTS = ["the quick brown fox", "hello world, hello", "Serving many LoRA adapters",
           "what is the answer?", "the lazy dog", "one base model: the engine", "42", "jumps over"]


@pytest.fixture(scope="module")
def model(tiny_checkpoint):
    return tiny_checkpoint("llama")


@pytest.fixture(scope="module")
def free_run(model):
    """Each prompt's greedy output without stops: where stop tokens and strings can be put."""
    outs, _ = _generate(model, PROMPTS, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True),
                        async_scheduling=False)
    return [o.outputs[0] for o in outs]


def _mixed_params(free_run):
    params = []
    for i, out in enumerate(free_run):
        kind = i % 8
        if kind == 0:
            p = SamplingParams(temperature=0, max_tokens=5 + i)                      # length (or EOS)
        elif kind == 1:
            p = SamplingParams(temperature=0, max_tokens=24, stop_token_ids=[out.token_ids[6]])
        elif kind == 2:
            text = out.text
            p = SamplingParams(temperature=0, max_tokens=24, stop=[text[len(text) // 2:len(text) // 2 + 3]])
        elif kind == 3:
            p = SamplingParams(temperature=0.6, seed=5 + i, max_tokens=20, logprobs=3, n=2)
        elif kind == 4:
            text = out.text
            p = SamplingParams(temperature=0, max_tokens=24, stop=[text[5:8]], include_stop_str_in_output=True,
                               logprobs=0)
        elif kind == 5:
            p = SamplingParams(temperature=0.8, top_k=20, seed=11 + i, max_tokens=16, n=3)   # seeded samples
        elif kind == 6:
            p = SamplingParams(temperature=0, max_tokens=24, min_tokens=8, stop_token_ids=[out.token_ids[2]],
                               repetition_penalty=1.3, frequency_penalty=0.2)
        else:
            p = SamplingParams(temperature=0, max_tokens=None, stop_token_ids=[out.token_ids[3]])
        params.append(p)
    return params


def test_mixed_requests_match_lock_step_token_for_token(model, free_run):
    params = _mixed_params(free_run)
    sync, _ = _generate(model, PROMPTS, params, async_scheduling=False)
    overlapped, engine = _generate(model, PROMPTS, params)
    _same(overlapped, sync)
    reasons = {c.finish_reason for o in sync for c in o.outputs}
    assert reasons == {"stop", "length"}
    assert {type(c.stop_reason) for o in sync for c in o.outputs} >= {int, str, type(None)}
    # Stop tokens and strings ended sequences that the next step had already scheduled.
    assert engine.core.num_discarded_tokens > 0
    assert not engine.has_unfinished_requests()
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


@pytest.mark.parametrize("config", [dict(max_num_batched_tokens=16),                  # chunked prefill
                                    dict(kv_cache_bytes=6 * 16 * 2 * 2 * 2 * 16 * 4,   # 6 blocks: preemption
                                         max_model_len=96),
                                    dict(max_num_seqs=3)])
def test_chunked_prefill_preemption_and_small_batches_match(model, free_run, config):
    params = _mixed_params(free_run)
    sync, sync_engine = _generate(model, PROMPTS, params, async_scheduling=False, **config)
    overlapped, engine = _generate(model, PROMPTS, params, **config)
    _same(overlapped, sync)
    if "kv_cache_bytes" in config:
        assert engine.block_manager.num_blocks == 6
        assert engine.scheduler.num_preemptions > 0 and sync_engine.scheduler.num_preemptions > 0
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_max_model_len_finishes_the_same(model):
    params = SamplingParams(temperature=0, max_tokens=None, ignore_eos=True)
    sync, _ = _generate(model, PROMPTS[:3], params, async_scheduling=False, max_model_len=24)
    overlapped, _ = _generate(model, PROMPTS[:3], params, max_model_len=24)
    _same(overlapped, sync)
    assert all(len(o.prompt_token_ids) + len(o.outputs[0].token_ids) == 24 for o in sync)


def test_an_abort_mid_stream_leaves_the_others_unchanged(model):
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    expected = {f"r{i}": o for i, o in enumerate(_generate(model, PROMPTS[:4], params, async_scheduling=False)[0])}
    engine = _llm(model).llm_engine
    for i, prompt in enumerate(PROMPTS[:4]):
        engine.add_request(f"r{i}", prompt, params)
    finals, aborted = {}, None
    for step in range(40):
        if not engine.has_unfinished_requests():
            break
        for out in engine.step():
            if out.finished:
                finals[out.request_id] = out
        if step == 4:
            (aborted,) = engine.abort_request("r1")
    assert set(finals) == {"r0", "r2", "r3"}
    for rid, out in finals.items():
        assert out.outputs[0].token_ids == expected[rid].outputs[0].token_ids
    partial = aborted.outputs[0]
    assert partial.finish_reason == "abort" and 0 < len(partial.token_ids) < 12
    assert partial.token_ids == expected["r1"].outputs[0].token_ids[:len(partial.token_ids)]
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_decode_steps_feed_the_sampled_ids_on_the_device():
    """Steady decode steps take their input ids from the previous step's device tensor; a length
    finish is known in advance (nothing extra computed), a stop token costs one discarded row."""
    class CountingRunner(FakeRunner):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.with_device_ids = 0

        def execute(self, scheduled, sampled_token_ids=None):
            self.with_device_ids += sampled_token_ids is not None
            return super().execute(scheduled, sampled_token_ids)

    params = SamplingParams(temperature=0, max_tokens=10)
    requests = [(f"r{i}", [i + 1, 2, 3], params) for i in range(4)]
    sync_runner, runner = CountingRunner(), CountingRunner()
    sync = run_all(fake_engine(sync_runner, async_scheduling=False), requests)
    engine = fake_engine(runner)
    overlapped = run_all(engine, requests)
    assert {r: o.outputs[0].token_ids for r, o in overlapped.items()} == \
        {r: o.outputs[0].token_ids for r, o in sync.items()}
    assert sync_runner.with_device_ids == 0
    assert runner.with_device_ids == 9                       # every decode step after the prefill
    assert sum(runner.num_tokens_per_step) == sum(sync_runner.num_tokens_per_step)
    assert engine.core.num_discarded_tokens == 0

    script = [10, 11, 12, 13, 14, 15]
    stop = SamplingParams(max_tokens=6, stop_token_ids=[12])
    sync = run_all(fake_engine(ScriptedRunner(script), async_scheduling=False), [("a", [1], stop)])
    engine = fake_engine(ScriptedRunner(script))
    overlapped = run_all(engine, [("a", [1], stop)])
    assert overlapped["a"].outputs[0].token_ids == sync["a"].outputs[0].token_ids == [10, 11, 12]
    assert engine.core.num_discarded_tokens == 1             # the step after the stop token ran


def test_a_runner_without_sampled_ids_runs_in_lock_step():
    class OldRunner(FakeRunner):
        def execute(self, scheduled):                      # no sampled_token_ids: cannot overlap
            return super().execute(scheduled)

    params = SamplingParams(temperature=0, max_tokens=8)
    engine = fake_engine(OldRunner())
    assert not engine.core.async_scheduling and fake_engine(FakeRunner()).core.async_scheduling
    out = run_all(engine, [("a", [1, 2, 3], params)])
    assert out["a"].outputs[0].token_ids == run_all(fake_engine(), [("a", [1, 2, 3], params)])["a"].outputs[0].token_ids
