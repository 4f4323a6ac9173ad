"""AsyncEngine: streaming, concurrency, aborts (explicit and by cancellation), errors, shutdown."""

import asyncio
import threading
import time

import pytest

from fake_runner import FakeRunner, fake_engine, run_all
from loraplex import LLM, SamplingParams
from loraplex.core.async_engine import AsyncEngine
from loraplex.core.config import EngineConfig
from loraplex.core.llm_engine import LLMEngine
from loraplex.errors import EngineDeadError, InvalidRequestError


class SlowRunner(FakeRunner):
    """A FakeRunner whose steps take a while, so requests are still running when we act."""

    def __init__(self, delay=0.01, fail_after=None, **kwargs):
        super().__init__(**kwargs)
        self.delay, self.fail_after, self.calls = delay, fail_after, 0
        self.threads = set()

    def execute(self, scheduled, sampled_token_ids=None):
        self.calls += 1
        self.threads.add(threading.get_ident())
        if self.fail_after is not None and self.calls > self.fail_after:
            raise RuntimeError("device fell over")
        time.sleep(self.delay)
        return super().execute(scheduled, sampled_token_ids)


@pytest.fixture
def make_engine():
    engines = []

    def make(runner=None, **config):
        engine = AsyncEngine(fake_engine(runner or FakeRunner(), **config))
        engines.append(engine)
        return engine

    yield make
    for engine in engines:
        engine.shutdown()
        assert not engine._handle.thread.is_alive() and not engine._reader.is_alive()


async def _collect(engine, prompt, params, request_id):
    return [out async for out in engine.generate(prompt, params, request_id)]


async def _wait_until(condition, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.01)


def test_streams_cumulative_outputs_from_the_engine_thread(make_engine):
    runner = SlowRunner(delay=0)
    engine = make_engine(runner)
    params = SamplingParams(temperature=0, max_tokens=6)
    outs = asyncio.run(_collect(engine, [1, 2, 3], params, "a"))
    lengths = [len(o.outputs[0].token_ids) for o in outs]
    # One output per step, unless the reader fell behind (then waiting ones come as one).
    assert lengths == sorted(set(lengths)) and lengths[-1] == 6
    assert [o.finished for o in outs] == [False] * (len(outs) - 1) + [True]
    expected = run_all(fake_engine(), [("a", [1, 2, 3], params)])["a"].outputs[0].token_ids
    assert outs[-1].outputs[0].token_ids == expected
    assert threading.get_ident() not in runner.threads         # the model never ran on the loop's thread


def test_fifty_concurrent_requests_each_match_a_solo_run(make_engine):
    engine = make_engine(max_num_seqs=16, max_num_batched_tokens=64)
    requests = [(f"r{i}", [(i * 5 + j) % 60 + 1 for j in range(2 + i % 9)],
                 SamplingParams(temperature=0, max_tokens=3 + i % 7) if i % 2 else
                 SamplingParams(temperature=1.0, seed=i, max_tokens=3 + i % 7)) for i in range(50)]

    async def main():
        return await asyncio.gather(*(_collect(engine, p, sp, rid) for rid, p, sp in requests))

    results = asyncio.run(main())
    for (rid, prompt, params), outs in zip(requests, results):
        solo = run_all(fake_engine(), [(rid, prompt, params)])[rid]
        assert outs[-1].request_id == rid and outs[-1].finished
        assert outs[-1].outputs[0].token_ids == solo.outputs[0].token_ids
    assert engine.engine.block_manager.num_free_blocks == engine.engine.block_manager.num_blocks


def test_abort_ends_the_stream_and_frees_blocks(make_engine):
    engine = make_engine(SlowRunner())
    blocks = engine.engine.block_manager

    async def main():
        outs = []
        async for out in engine.generate([1, 2, 3, 4, 5], SamplingParams(max_tokens=200, ignore_eos=True), "a"):
            outs.append(out)
            if len(outs) == 2:
                assert blocks.num_free_blocks < blocks.num_blocks
                await engine.abort("a")
        return outs

    outs = asyncio.run(main())
    assert outs[-1].finished and outs[-1].outputs[0].finish_reason == "abort"
    assert len(outs[-1].outputs[0].token_ids) < 200
    # The abort is a message to the engine loop: it lands before the loop's next step.
    asyncio.run(_wait_until(lambda: blocks.num_free_blocks == blocks.num_blocks, timeout=5))
    assert not engine.engine.has_unfinished_requests()


@pytest.mark.parametrize("how", ["cancel", "break"])
def test_consumer_going_away_aborts_the_request(make_engine, how):
    engine = make_engine(SlowRunner())
    blocks = engine.engine.block_manager
    params = SamplingParams(max_tokens=200, ignore_eos=True)

    async def consume(started):
        async for out in engine.generate([1, 2, 3], params, "a"):
            started.set()
            if how == "break":
                break

    async def main():
        started = asyncio.Event()
        task = asyncio.create_task(consume(started))
        await started.wait()
        if how == "cancel":
            task.cancel()
        with pytest.raises(asyncio.CancelledError) if how == "cancel" else _nothing():
            await task
        await _wait_until(lambda: not engine.engine.has_unfinished_requests())
        # Another request is served afterwards.
        outs = await _collect(engine, [4, 5], SamplingParams(max_tokens=3), "b")
        assert outs[-1].finished

    asyncio.run(main())
    assert blocks.num_free_blocks == blocks.num_blocks


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_a_failing_step_reaches_every_consumer_and_later_callers(make_engine):
    engine = make_engine(SlowRunner(fail_after=3))

    async def one(i):
        with pytest.raises(EngineDeadError, match="device fell over"):
            await _collect(engine, [i + 1, 2], SamplingParams(max_tokens=50, ignore_eos=True), f"r{i}")

    async def main():
        await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(5))), timeout=30)
        with pytest.raises(EngineDeadError):
            await _collect(engine, [1], SamplingParams(), "late")

    asyncio.run(main())
    assert not engine.is_running


def test_bad_requests_raise_at_once_and_others_keep_going(make_engine):
    # Slow steps: "dup" must still be running when its id is reused (a fast runner could
    # finish all its tokens before the second request is submitted, freeing the id).
    engine = make_engine(SlowRunner(max_model_len=32))

    async def main():
        good = asyncio.create_task(_collect(engine, [1, 2], SamplingParams(max_tokens=20), "good"))
        with pytest.raises(InvalidRequestError, match="max_model_len is 32"):
            await _collect(engine, list(range(1, 40)), SamplingParams(), "long")
        with pytest.raises(InvalidRequestError, match="top_k"):
            await _collect(engine, [1], SamplingParams(top_k=-5), "bad")
        outs = await good
        with pytest.raises(InvalidRequestError, match="already in use"):
            slow = engine.generate([3], SamplingParams(max_tokens=25, ignore_eos=True), "dup")
            first = await slow.__anext__()
            await _collect(engine, [3], SamplingParams(), "dup")
        await slow.aclose()
        return outs, first

    outs, first = asyncio.run(main())
    assert len(outs[-1].outputs[0].token_ids) == 20 and first.request_id == "dup"
    assert engine.is_running


def test_engine_calls_run_on_the_engine_thread(make_engine):
    engine = make_engine()

    async def main():
        with pytest.raises(InvalidRequestError, match="LoRA is not enabled"):
            await engine.list_loras()

    asyncio.run(main())


def test_shutdown_joins_the_thread_and_fails_pending_consumers():
    engine = AsyncEngine(fake_engine(SlowRunner()))

    async def main():
        task = asyncio.create_task(_collect(engine, [1], SamplingParams(max_tokens=500, ignore_eos=True), "a"))
        await _wait_until(lambda: engine.engine.has_unfinished_requests())
        await asyncio.to_thread(engine.shutdown)
        with pytest.raises(EngineDeadError, match="shut down"):
            await task
        with pytest.raises(EngineDeadError):
            await _collect(engine, [1], SamplingParams(), "b")

    asyncio.run(main())
    assert not engine._handle.thread.is_alive() and not engine._reader.is_alive()


def test_real_model_stream_equals_the_offline_result(tiny_checkpoint):
    path = str(tiny_checkpoint("llama"))
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    expected = LLM(model=path, device="cpu").generate("The capital of France is", params, use_tqdm=False)[0]
    engine = AsyncEngine(LLMEngine(EngineConfig(model=path, device="cpu")))
    try:
        outs = asyncio.run(_collect(engine, "The capital of France is", params, "a"))
    finally:
        engine.shutdown()
    final = outs[-1].outputs[0]
    assert final.token_ids == expected.outputs[0].token_ids and final.text == expected.outputs[0].text
    texts = [o.outputs[0].text for o in outs]
    assert all(b.startswith(a) for a, b in zip(texts, texts[1:]))
