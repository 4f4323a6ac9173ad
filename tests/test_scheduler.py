"""Scheduler: token budget, chunked prefill, mixed batches, preemption by recompute,
FCFS without starvation, the LoRA admission cap, and request-size errors.

FakeRunner derives logits from the tokens it reads back through the block
tables, so a scheduling or block bug shows up as different tokens.
"""

import pytest

from fake_runner import FakeRunner, fake_engine, run_all
from loraplex import LoRARequest, SamplingParams
from loraplex.core.sequence import SequenceStatus
from loraplex.errors import ConfigError, InvalidRequestError

GREEDY = SamplingParams(temperature=0, max_tokens=12)


def _requests(num, params=GREEDY):
    # Mixed prompt lengths: 3 .. 3 + 5 * (num - 1) tokens.
    return [(f"r{i}", [(7 * i + j) % 60 + 1 for j in range(3 + 5 * i)], params) for i in range(num)]


def _tokens(outputs):
    return {rid: out.outputs[0].token_ids for rid, out in outputs.items()}


@pytest.fixture(scope="module")
def reference():
    """Each request run alone, with plenty of budget and blocks."""
    return {rid: _tokens(run_all(fake_engine(), [(rid, prompt, params)]))[rid]
            for rid, prompt, params in _requests(6)}


def test_batched_requests_match_each_request_alone(reference):
    runner = FakeRunner()
    out = run_all(fake_engine(runner), _requests(6))
    assert _tokens(out) == reference
    assert max(runner.batch_sizes) == 6


def test_long_prompts_are_chunked_to_the_token_budget(reference):
    runner = FakeRunner()
    engine = fake_engine(runner, max_num_batched_tokens=8)
    assert _tokens(run_all(engine, _requests(6))) == reference
    assert max(runner.num_tokens_per_step) == 8
    # r5's 28-token prompt alone needs 4 steps of 8 tokens.
    runner = FakeRunner()
    run_all(fake_engine(runner, max_num_batched_tokens=8), [_requests(6)[5]])
    assert runner.num_tokens_per_step[:5] == [8, 8, 8, 4, 1]


def test_long_prefill_token_threshold_caps_each_prompt_per_step(reference):
    """vLLM's long_prefill_token_threshold: no sequence computes more than the threshold in a
    step, whether it is admitted or already running, though the budget would take it whole;
    decodes and short prompts are untouched, and the tokens are the same."""
    runner = FakeRunner()
    assert _tokens(run_all(fake_engine(runner, long_prefill_token_threshold=6), _requests(6))) == reference
    runner = FakeRunner()
    run_all(fake_engine(runner, long_prefill_token_threshold=6), [_requests(6)[5]])
    assert runner.num_tokens_per_step[:6] == [6, 6, 6, 6, 4, 1]     # r5's 28-token prompt
    engine = fake_engine(long_prefill_token_threshold=10)
    engine.add_request("a", [1, 2, 3], GREEDY)
    engine.step()                                        # a: prefill
    engine.add_request("b", list(range(1, 30)), GREEDY)
    engine.add_request("c", list(range(1, 5)), GREEDY)
    plan = engine.scheduler.schedule()
    assert {s.seq.request_id: s.num_new_tokens for s in plan.scheduled} == {"a": 1, "b": 10, "c": 4}
    with pytest.raises(ConfigError, match="long_prefill_token_threshold must be an integer >= 0"):
        fake_engine(long_prefill_token_threshold=-1)


def test_a_step_mixes_decodes_and_a_prefill():
    engine = fake_engine(max_num_batched_tokens=16)
    engine.add_request("a", [1, 2, 3], GREEDY)
    engine.step()                                        # a: prefill
    engine.add_request("b", list(range(1, 30)), GREEDY)
    plan = engine.scheduler.schedule()
    kinds = {s.seq.request_id: s.num_new_tokens for s in plan.scheduled}
    assert kinds == {"a": 1, "b": 15}                    # a decodes, b gets the rest of the budget


def test_max_num_seqs_caps_the_batch(reference):
    runner = FakeRunner()
    out = run_all(fake_engine(runner, max_num_seqs=2), _requests(6))
    assert _tokens(out) == reference
    assert max(runner.batch_sizes) == 2


def test_preemption_by_recompute_gives_the_same_tokens(reference):
    # 12 blocks of 4 tokens: the six requests need up to 40 tokens each, so they cannot all run.
    runner = FakeRunner(num_kv_blocks=12, block_size=4)
    engine = fake_engine(runner)
    seqs = {}
    for rid, prompt, params in _requests(6):
        engine.add_request(rid, prompt, params)
        seqs[rid] = engine.core._requests[rid][0]
    finals = {}
    while engine.has_unfinished_requests():
        assert engine.block_manager.num_used_blocks <= 12
        finals.update({o.request_id: o for o in engine.step() if o.finished})
    assert engine.scheduler.num_preemptions > 0
    assert _tokens(finals) == reference
    assert seqs["r0"].num_preemptions == 0               # the oldest is never the victim
    assert engine.block_manager.num_free_blocks == 12


def test_preempted_sequence_goes_back_to_the_front_of_waiting():
    runner = FakeRunner(num_kv_blocks=4, block_size=2)
    engine = fake_engine(runner, async_scheduling=False)     # the steps below count in lock step
    engine.add_request("old", [1, 2, 3], SamplingParams(temperature=0, max_tokens=4))
    engine.add_request("new", [4, 5, 6], SamplingParams(temperature=0, max_tokens=4))
    engine.add_request("later", [7], SamplingParams(temperature=0, max_tokens=1))
    engine.step()                      # old, new: 2 blocks each; later waits for memory
    engine.step()                      # 4th tokens fit in the 2 blocks
    engine.step()                      # both need a 3rd block: new is preempted
    new = engine.core._requests["new"][0]
    assert new.status is SequenceStatus.WAITING and new.num_computed_tokens == 0
    assert new.num_output_tokens == 2 and new.block_table == []
    assert [s.request_id for s in engine.scheduler.waiting] == ["new", "later"]


def test_prompt_longer_than_max_model_len_is_rejected_with_both_numbers():
    engine = fake_engine(FakeRunner(max_model_len=32))
    with pytest.raises(InvalidRequestError, match=r"40 tokens.*max_model_len is 32"):
        engine.add_request("long", list(range(1, 41)), GREEDY)
    with pytest.raises(InvalidRequestError, match="empty"):
        engine.add_request("empty", [], GREEDY)
    with pytest.raises(InvalidRequestError, match=r"\[0, 64\)"):
        engine.add_request("oov", [1, 64], GREEDY)
    out = run_all(engine, [("ok", [1, 2, 3], GREEDY)])
    assert out["ok"].outputs[0].finish_reason == "length"


def test_request_that_can_never_fit_in_the_kv_cache_is_rejected():
    engine = fake_engine(FakeRunner(num_kv_blocks=4, block_size=4, max_model_len=64))
    with pytest.raises(InvalidRequestError, match="KV-cache blocks"):
        engine.add_request("big", [1] * 10, SamplingParams(max_tokens=20))
    # max_tokens=None means up to max_model_len, which does not fit either.
    with pytest.raises(InvalidRequestError, match="lower max_tokens"):
        engine.add_request("big", [1] * 10, SamplingParams(max_tokens=None))
    out = run_all(engine, [("fits", [1] * 10, SamplingParams(max_tokens=7))])
    assert len(out["fits"].outputs[0].token_ids) == 7


def test_generation_stops_at_max_model_len():
    engine = fake_engine(FakeRunner(max_model_len=10))
    out = run_all(engine, [("a", [1] * 6, SamplingParams(max_tokens=None, ignore_eos=True))])
    completion = out["a"].outputs[0]
    assert len(completion.token_ids) == 4 and completion.finish_reason == "length"


def test_duplicate_request_id_is_rejected():
    engine = fake_engine()
    engine.add_request("a", [1], GREEDY)
    with pytest.raises(InvalidRequestError, match="already in use"):
        engine.add_request("a", [2], GREEDY)


def _lora(name, lora_id):
    return LoRARequest(name, lora_id, f"/adapters/{name}")


def test_lora_admission_caps_distinct_adapters_per_step():
    runner = FakeRunner()
    engine = fake_engine(runner, enable_lora=True, max_loras=2)
    loras = [_lora("a", 1), _lora("b", 2), _lora("c", 3)]
    for i in range(9):
        engine.add_request(f"r{i}", [i + 1, 2], SamplingParams(max_tokens=3 + i % 4), loras[i % 3])
    engine.add_request("base", [5, 5], SamplingParams(max_tokens=3))
    finished = set()
    while engine.has_unfinished_requests():
        running = {s.lora_request.lora_int_id for s in engine.scheduler.running if s.lora_request}
        assert len(running) <= 2
        finished |= {o.request_id for o in engine.step() if o.finished}
    assert finished == {f"r{i}" for i in range(9)} | {"base"}


def test_a_request_waiting_for_an_adapter_slot_is_not_starved():
    engine = fake_engine(enable_lora=True, max_loras=1)
    a, b = _lora("a", 1), _lora("b", 2)
    engine.add_request("a0", [1, 2], SamplingParams(max_tokens=4), a)
    engine.add_request("b0", [3, 4], SamplingParams(max_tokens=2), b)
    engine.step()
    # A steady stream of new requests for the running adapter "a", plus base-model requests.
    done, step = set(), 0
    while "b0" not in done:
        step += 1
        assert step < 30, "b0 starved"
        engine.add_request(f"a{step}", [1, 2], SamplingParams(max_tokens=4), a)
        engine.add_request(f"base{step}", [6], SamplingParams(max_tokens=2))
        done |= {o.request_id for o in engine.step() if o.finished}
    assert any(r.startswith("base") for r in done)      # base requests were not held up


def test_waiting_requests_of_slot_holders_fill_the_batch_while_another_adapter_waits():
    engine = fake_engine(enable_lora=True, max_loras=2)
    loras = [_lora("a", 1), _lora("b", 2), _lora("c", 3)]
    for i in range(12):
        engine.add_request(f"r{i}", [i + 1, 2], SamplingParams(max_tokens=3), loras[i % 3])
    engine.step()
    # All 8 requests of the two adapters given slots run; not just the first of each.
    assert sorted(s.lora_request.lora_int_id for s in engine.scheduler.running) == [1] * 4 + [2] * 4
    finished, steps = set(), 1
    while engine.has_unfinished_requests():
        finished |= {o.request_id for o in engine.step() if o.finished}
        steps += 1
    assert finished == {f"r{i}" for i in range(12)}
    assert steps <= 8        # two waves of 3 decode steps (+ the wave change); one per adapter took 18


def test_lora_request_needs_enable_lora():
    with pytest.raises(InvalidRequestError, match="enable_lora=True"):
        fake_engine().add_request("a", [1], GREEDY, _lora("a", 1))
