"""SamplingParams.output_kind (vLLM's RequestOutputKind): cumulative, delta and final-only outputs
carry the same generation, and a streaming consumer that falls behind gets the waiting outputs as one.
SamplingParams.stream_interval: outputs every k tokens, the first and the last at once."""

import asyncio
import time

import pytest

from fake_runner import FakeRunner, ScriptedRunner, fake_engine
from loraplex import RequestOutputKind, SamplingParams
from loraplex.core.async_engine import AsyncEngine
from loraplex.core.tokenizer import Tokenizer
from loraplex.errors import InvalidRequestError
from models import write_tiny_tokenizer

MULTIBYTE = "héllo wörld: 日本語 and 🎉 done, the end"


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return Tokenizer(write_tiny_tokenizer(tmp_path_factory.mktemp("tok")))


def _outputs(engine, prompt, params, kind, abort_after=None):
    params = SamplingParams(**{**params, "output_kind": kind})
    engine.add_request("a", prompt, params)
    outs, steps = [], 0
    while engine.has_unfinished_requests():
        outs += engine.step()
        steps += 1
        if abort_after is not None and steps == abort_after:
            outs += engine.abort_request("a")
    return outs


def _joined(outs):
    """Per sample index: (text, token ids, logprobs, finish_reason, stop_reason) of delta outputs joined."""
    joined = {}
    for out in outs:
        for c in out.outputs:
            text, ids, lps, _, _ = joined.get(c.index, ("", [], [], None, None))
            joined[c.index] = (text + c.text, ids + c.token_ids, lps + (c.logprobs or []),
                               c.finish_reason, c.stop_reason)
    return joined


def _final(out):
    return {c.index: (c.text, c.token_ids, c.logprobs or [], c.finish_reason, c.stop_reason) for c in out.outputs}


CASES = {
    # multibyte characters split over tokens, and a stop string spanning tokens (held-back text)
    "stop string": (MULTIBYTE, {"max_tokens": 60, "stop": ["the e", "zzz"]}),
    "include stop": (MULTIBYTE, {"max_tokens": 60, "stop": "and", "include_stop_str_in_output": True}),
    "length, logprobs": (MULTIBYTE, {"max_tokens": 9, "logprobs": 2}),
    "two samples": (MULTIBYTE, {"max_tokens": 12, "n": 2, "temperature": 1.0, "seed": 7}),
}


def _case(tokenizer, case):
    """(params, a fresh engine that generates the case's text, the prompt) of one of CASES."""
    text, params = CASES[case]
    script = tokenizer.encode(text)

    def engine():
        return fake_engine(ScriptedRunner(script + [5] * 60, vocab_size=tokenizer.vocab_size,
                                          eos_token_id=tokenizer.eos_token_id), tokenizer=tokenizer)

    return params, engine, tokenizer.encode("q: say it")


@pytest.mark.parametrize("case", CASES)
def test_delta_outputs_join_to_the_cumulative_ones_and_final_only_is_the_last(tokenizer, case):
    params, engine, prompt = _case(tokenizer, case)
    cumulative = _outputs(engine(), prompt, params, RequestOutputKind.CUMULATIVE)
    delta = _outputs(engine(), prompt, params, RequestOutputKind.DELTA)
    final = _outputs(engine(), prompt, params, RequestOutputKind.FINAL_ONLY)
    assert len(cumulative) > 3 and len(delta) == len(cumulative)
    assert _joined(delta) == _final(cumulative[-1]) == _final(final[0])
    assert len(final) == 1 and final[0].finished
    assert [o.finished for o in delta] == [o.finished for o in cumulative]
    for out in delta:   # every delta says something: new text, new tokens or the finish
        assert out.outputs and all(c.text or c.token_ids or c.finish_reason for c in out.outputs)
    if "stop" in params:
        assert cumulative[-1].outputs[0].finish_reason == "stop"


@pytest.mark.parametrize("interval", [2, 5])
@pytest.mark.parametrize("case", CASES)
def test_a_stream_interval_hands_out_the_same_generation_every_k_tokens(tokenizer, case, interval):
    params, engine, prompt = _case(tokenizer, case)
    every_token = _outputs(engine(), prompt, params, RequestOutputKind.CUMULATIVE)
    for kind in (RequestOutputKind.DELTA, RequestOutputKind.CUMULATIVE):
        outs = _outputs(engine(), prompt, {**params, "stream_interval": interval}, kind)
        final = _joined(outs) if kind == RequestOutputKind.DELTA else _final(outs[-1])
        assert final == _final(every_token[-1])
        # The first token at once, then one output per `interval` tokens of a sample, the finish at once.
        generated = max(len(ids) for _, ids, *_ in final.values())
        assert outs[-1].finished and not any(o.finished for o in outs[:-1])
        assert len(outs) == 1 + -(-(generated - 1) // interval), (len(outs), generated)
        assert len(outs) < len(every_token)
        if kind == RequestOutputKind.DELTA:
            assert [len(c.token_ids) for c in outs[0].outputs] == [1] * len(outs[0].outputs)
            for out in outs[1:-1]:
                assert max(len(c.token_ids) for c in out.outputs) == interval


def test_stream_interval_is_checked():
    for bad in (0, -1, 1.5, "2"):
        with pytest.raises(InvalidRequestError, match="stream_interval"):
            SamplingParams(stream_interval=bad)


def test_delta_outputs_of_the_demo_model_with_logprobs_prompt_logprobs_and_two_samples():
    from loraplex import LLM
    from loraplex.demo import demo_model_path

    engine = LLM(str(demo_model_path()), device="cpu").llm_engine
    params = {"max_tokens": 10, "n": 2, "temperature": 1.0, "seed": 3, "logprobs": 2, "prompt_logprobs": 1}
    prompt = engine.tokenizer.encode("upper: hello there")
    cumulative = _outputs(engine, prompt, params, RequestOutputKind.CUMULATIVE)
    delta = _outputs(engine, prompt, params, RequestOutputKind.DELTA)
    assert _joined(delta) == _final(cumulative[-1])
    assert len(_final(cumulative[-1])) == 2 and all(len(v[1]) == 10 for v in _joined(delta).values())
    assert delta[0].prompt_logprobs == cumulative[-1].prompt_logprobs
    assert len(delta[0].prompt_logprobs) == len(prompt)
    assert all(o.prompt_logprobs is None for o in delta[1:])
    assert all(o.prompt_logprobs is not None for o in cumulative)


def test_an_aborted_delta_request_hands_out_the_rest_of_its_text(tokenizer):
    script = tokenizer.encode(MULTIBYTE)

    def engine():
        return fake_engine(ScriptedRunner(script, vocab_size=tokenizer.vocab_size), tokenizer=tokenizer)

    params = {"max_tokens": 40, "stop": ["zzzzzz"]}          # holds five characters back while running
    cumulative = _outputs(engine(), [7, 8], params, RequestOutputKind.CUMULATIVE, abort_after=8)
    delta = _outputs(engine(), [7, 8], params, RequestOutputKind.DELTA, abort_after=8)
    assert cumulative[-1].outputs[0].finish_reason == "abort"
    assert _joined(delta) == _final(cumulative[-1])
    assert len(delta[-1].outputs[0].text) >= 1                 # the held-back characters came with the abort


def test_output_kind_is_checked():
    with pytest.raises(InvalidRequestError, match="output_kind"):
        SamplingParams(output_kind=7)
    assert SamplingParams(output_kind=1).output_kind is RequestOutputKind.DELTA


@pytest.mark.parametrize("kind", [RequestOutputKind.CUMULATIVE, RequestOutputKind.DELTA])
def test_a_consumer_that_fell_behind_gets_the_waiting_outputs_as_one(kind):
    """The output thread queues one output per step; a consumer whose event loop was busy until the
    request finished gets all of them as one output, equal to what a prompt reader got in several."""
    engine = AsyncEngine(fake_engine(FakeRunner()))
    params = SamplingParams(temperature=0, max_tokens=8, logprobs=1, output_kind=kind)

    async def prompt_reader():
        return [out async for out in engine.generate([1, 2, 3], params, "prompt")]

    async def late_reader():
        stream = engine.generate([1, 2, 3], params, "late")
        first = asyncio.ensure_future(stream.__anext__())
        await asyncio.sleep(0)            # the request is submitted; its reader waits for outputs
        deadline = time.monotonic() + 10
        while engine._streams:            # the loop is blocked until the final output is queued for it
            assert time.monotonic() < deadline
            time.sleep(0.01)
        time.sleep(0.2)
        return [await first] + [out async for out in stream]

    try:
        prompt = asyncio.run(prompt_reader())
        late = asyncio.run(late_reader())
    finally:
        engine.shutdown()
    assert prompt[-1].finished and len(late) == 1 and late[0].finished
    assert len(late[0].outputs[0].token_ids) == 8 and len(late[0].outputs[0].logprobs) == 8
    if kind == RequestOutputKind.DELTA:
        assert _joined(late) == _joined(prompt)
    else:
        assert _final(late[-1]) == _final(prompt[-1])
