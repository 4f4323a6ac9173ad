"""Sampler: greedy, logprobs, penalties, top-k/top-p/min-p, seeds, min_tokens and stop ids.

Most tests run the whole LLMEngine over FakeRunner, whose logits are a known
function of the context, so every sampled token can be checked against a
direct computation.
"""

import math

import pytest
import torch

from fake_runner import FakeRunner, ScriptedRunner, fake_engine, run_all
from loraplex import SamplingParams
from loraplex.core.sampler import Sampler, apply_penalties, filtered_probs
from loraplex.core.sequence import Sequence


def _seq(prompt, output, params):
    seq = Sequence(seq_id=0, token_ids=list(prompt) + list(output), num_prompt_tokens=len(prompt))
    seq.sampling_params = params
    return seq


def test_greedy_takes_the_argmax_of_each_step():
    runner = FakeRunner()
    out = run_all(fake_engine(runner), [("a", [3, 1, 4, 1, 5], SamplingParams(temperature=0, max_tokens=10))])
    tokens = out["a"].outputs[0].token_ids
    context = [3, 1, 4, 1, 5]
    for token in tokens:
        assert token == int(runner.context_logits(context).argmax())
        context.append(token)
    assert len(tokens) == 10 and out["a"].outputs[0].finish_reason == "length"


def test_logprobs_are_the_log_softmax_of_the_raw_logits():
    runner = FakeRunner()
    params = SamplingParams(temperature=0.7, top_k=5, seed=1, max_tokens=6, logprobs=3)
    completion = run_all(fake_engine(runner), [("a", [9, 8, 7], params)])["a"].outputs[0]
    context = [9, 8, 7]
    total = 0.0
    for token, entry in zip(completion.token_ids, completion.logprobs):
        raw = torch.log_softmax(runner.context_logits(context), dim=-1)
        top_vals, top_ids = raw.topk(3)
        for rank, (tid, val) in enumerate(zip(top_ids.tolist(), top_vals.tolist()), start=1):
            assert entry[tid].logprob == pytest.approx(val, abs=1e-5)
            assert entry[tid].rank == rank
        assert entry[token].logprob == pytest.approx(float(raw[token]), abs=1e-5)
        assert entry[token].rank == int((raw > raw[token]).sum()) + 1
        assert set(entry) <= set(top_ids.tolist()) | {token}
        total += float(raw[token])
        context.append(token)
    assert completion.cumulative_logprob == pytest.approx(total, abs=1e-4)
    assert len(completion.logprobs) == len(completion.token_ids) == 6


def test_logprobs_zero_gives_the_sampled_token_alone():
    runner = FakeRunner()
    params = SamplingParams(temperature=1.5, seed=2, max_tokens=8, logprobs=0)
    completion = run_all(fake_engine(runner), [("a", [4, 5], params)])["a"].outputs[0]
    context = [4, 5]
    for token, entry in zip(completion.token_ids, completion.logprobs):
        raw = torch.log_softmax(runner.context_logits(context), dim=-1)
        assert list(entry) == [token]
        assert entry[token].rank == int((raw > raw[token]).sum()) + 1
        context.append(token)
    assert len(completion.logprobs) == 8


def test_no_logprobs_unless_asked():
    completion = run_all(fake_engine(), [("a", [1, 2], SamplingParams(max_tokens=3))])["a"].outputs[0]
    assert completion.logprobs is None and completion.cumulative_logprob is None


def test_penalties_match_a_direct_computation():
    torch.manual_seed(0)
    vocab = 12
    cases = [([1, 2, 3], [3, 3, 5], SamplingParams(repetition_penalty=1.3)),
             ([4], [6, 6, 6, 7], SamplingParams(frequency_penalty=0.5, presence_penalty=0.25)),
             ([0, 11], [11, 2], SamplingParams(repetition_penalty=0.8, frequency_penalty=-0.3,
                                               presence_penalty=1.5)),
             ([5], [], SamplingParams())]
    logits = torch.randn(len(cases), vocab) * 3
    got = apply_penalties(logits.clone(), [_seq(p, o, sp) for p, o, sp in cases])
    for row, (prompt, output, sp) in enumerate(cases):
        for tok in range(vocab):
            x = float(logits[row, tok])
            if tok in prompt or tok in output:
                x = x / sp.repetition_penalty if x > 0 else x * sp.repetition_penalty
            x -= sp.frequency_penalty * output.count(tok)
            x -= sp.presence_penalty * (tok in output)
            assert float(got[row, tok]) == pytest.approx(x, abs=1e-5), (row, tok)


def _reference_probs(logits, p: SamplingParams):
    probs = torch.softmax(logits / p.temperature, dim=-1).tolist()
    order = sorted(range(len(probs)), key=lambda i: -probs[i])
    keep = set(order[:p.top_k] if p.top_k > 0 else order)
    kept_mass = sum(probs[i] for i in keep)
    mass, nucleus = 0.0, set()
    for i in order:
        if i not in keep:
            continue
        if mass / kept_mass >= p.top_p:
            break
        nucleus.add(i)
        mass += probs[i]
    renorm = {i: probs[i] / mass for i in nucleus}
    best = max(renorm.values())
    survivors = {i: q for i, q in renorm.items() if q >= p.min_p * best}
    total = sum(survivors.values())
    return [survivors.get(i, 0.0) / total for i in range(len(probs))]


@pytest.mark.parametrize("params", [
    SamplingParams(temperature=1.0, top_k=3),
    SamplingParams(temperature=0.5, top_p=0.6),
    SamplingParams(temperature=1.5, min_p=0.2),
    SamplingParams(temperature=0.9, top_k=5, top_p=0.8, min_p=0.1),
    SamplingParams(temperature=2.0, top_k=-1),
])
def test_top_k_top_p_min_p_masks_match_a_reference(params):
    torch.manual_seed(1)
    logits = torch.randn(3, 10) * 2
    got = filtered_probs(logits, [params] * 3)
    for row in range(3):
        expected = _reference_probs(logits[row], params)
        assert got[row].tolist() == pytest.approx(expected, abs=1e-5)
        if params.top_k > 0:
            assert int((got[row] > 0).sum()) <= params.top_k


def test_sampling_frequencies_follow_the_distribution():
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, -3.0]])
    params = SamplingParams(temperature=1.0, top_k=4)
    sampler = Sampler(torch.Generator().manual_seed(0))
    seq = _seq([0], [], params)
    counts = torch.zeros(6)
    for _ in range(3000):
        counts[sampler(logits, [seq], [set()]).token_ids[0]] += 1
    expected = filtered_probs(logits, [params])[0] * 3000
    assert counts[4:].sum() == 0
    assert torch.allclose(counts[:4], expected[:4], atol=5 * math.sqrt(3000 * 0.25))


def test_seeded_sampling_does_not_depend_on_the_batch():
    seeded = SamplingParams(temperature=1.0, seed=1234, max_tokens=12)
    alone = run_all(fake_engine(), [("x", [5, 6, 7], seeded)])["x"].outputs[0].token_ids
    crowd = [("x", [5, 6, 7], seeded)] + [
        (f"o{i}", [i + 1] * (i + 2), SamplingParams(temperature=1.0, seed=i if i % 2 else None, max_tokens=9))
        for i in range(6)]
    in_batch = run_all(fake_engine(seed=99), list(reversed(crowd)))["x"].outputs[0].token_ids
    assert in_batch == alone
    other_seed = run_all(fake_engine(), [("x", [5, 6, 7], SamplingParams(temperature=1.0, seed=4321,
                                                                         max_tokens=12))])
    assert other_seed["x"].outputs[0].token_ids != alone


def test_n_samples_have_their_own_reproducible_streams():
    params = SamplingParams(n=3, temperature=1.0, seed=7, max_tokens=10)
    first = run_all(fake_engine(), [("a", [1, 2, 3], params)])["a"]
    again = run_all(fake_engine(), [("a", [1, 2, 3], params)])["a"]
    samples = [c.token_ids for c in first.outputs]
    assert [c.index for c in first.outputs] == [0, 1, 2]
    assert samples == [c.token_ids for c in again.outputs]
    assert len({tuple(s) for s in samples}) == 3
    single = run_all(fake_engine(), [("a", [1, 2, 3], SamplingParams(temperature=1.0, seed=7, max_tokens=10))])
    assert single["a"].outputs[0].token_ids == samples[0]


def test_unseeded_requests_follow_the_engine_seed():
    params = SamplingParams(temperature=1.0, max_tokens=10)
    a = run_all(fake_engine(seed=5), [("a", [4, 4], params)])["a"].outputs[0].token_ids
    b = run_all(fake_engine(seed=5), [("a", [4, 4], params)])["a"].outputs[0].token_ids
    c = run_all(fake_engine(seed=6), [("a", [4, 4], params)])["a"].outputs[0].token_ids
    assert a == b and a != c


def test_eos_min_tokens_ignore_eos_and_stop_token_ids():
    script = [10, 2, 11, 12, 13, 14]                     # eos (2) comes second
    engine = lambda: fake_engine(ScriptedRunner(script, eos_token_id=2))  # noqa: E731
    out = run_all(engine(), [("a", [1], SamplingParams(max_tokens=6))])["a"].outputs[0]
    assert (out.token_ids, out.finish_reason, out.stop_reason) == ([10, 2], "stop", None)

    out = run_all(engine(), [("a", [1], SamplingParams(max_tokens=6, ignore_eos=True))])["a"].outputs[0]
    assert (out.token_ids, out.finish_reason) == (script, "length")

    out = run_all(engine(), [("a", [1], SamplingParams(max_tokens=6, stop_token_ids=[12]))])["a"].outputs[0]
    assert out.token_ids == [10, 2]                      # EOS still wins when it comes first

    params = SamplingParams(max_tokens=6, ignore_eos=True, stop_token_ids=[12])
    out = run_all(engine(), [("a", [1], params)])["a"].outputs[0]
    assert (out.token_ids, out.finish_reason, out.stop_reason) == ([10, 2, 11, 12], "stop", 12)


def test_min_tokens_masks_eos_in_the_logits():
    runner = FakeRunner()
    first = int(runner.context_logits([7, 7]).argmax())
    runner.eos_token_ids = [first]                       # greedy would stop at once
    out = run_all(fake_engine(runner), [("a", [7, 7], SamplingParams(temperature=0, max_tokens=5))])
    assert out["a"].outputs[0].token_ids == [first]
    out = run_all(fake_engine(runner), [("a", [7, 7], SamplingParams(temperature=0, max_tokens=5,
                                                                     min_tokens=3))])
    tokens = out["a"].outputs[0].token_ids
    assert len(tokens) >= 3 and first not in tokens[:3]


def test_model_dtype_logits_sample_as_their_float32_widening():
    # Runners hand over logits in the model's dtype; greedy batches with nothing to change take
    # their argmax directly, every other stage widens them first: the same tokens and logprobs
    # as the float32 copy of the same values, on every path.
    torch.manual_seed(0)
    logits = torch.randn(6, 50).bfloat16()
    logits[0, 7] = logits[0, 31] = logits[0].max() + 1          # a tie: the first index wins
    greedy = SamplingParams(temperature=0)
    cases = {
        "greedy": [greedy] * 6,
        "greedy with logprobs": [greedy, SamplingParams(temperature=0, logprobs=2)] * 3,
        "penalties": [greedy, SamplingParams(temperature=0, repetition_penalty=1.3, presence_penalty=0.5)] * 3,
        "min_tokens": [SamplingParams(temperature=0, min_tokens=2, stop_token_ids=[7, 31])] + [greedy] * 5,
        "seeded sampling": [SamplingParams(temperature=0.8, top_p=0.9, seed=i) for i in range(6)],
    }
    for name, params in cases.items():
        outs = []
        for values in (logits, logits.float()):
            seqs = [_seq([1, 2, 3], [7, 4], p) for p in params]
            for i, s in enumerate(seqs):
                s.seq_id = i
                s.generator = torch.Generator().manual_seed(p.seed) if (p := s.sampling_params).seed is not None else None
            stop_ids = [set(p.stop_token_ids or ()) for p in params]
            outs.append(Sampler(torch.Generator().manual_seed(5))(values, seqs, stop_ids))
        wide, narrow = outs[1], outs[0]
        assert torch.equal(narrow.token_ids, wide.token_ids), name
        asked = [i for i, p in enumerate(params) if p.logprobs is not None]
        assert (narrow.logprobs.rows if narrow.logprobs else []) == asked, name
        if wide.logprobs is not None:
            assert narrow.logprobs.chosen.dtype == torch.float32
            assert torch.equal(narrow.logprobs.chosen, wide.logprobs.chosen), name
            assert torch.equal(narrow.logprobs.top_ids, wide.logprobs.top_ids), name
    assert int(Sampler()(logits, [_seq([1], [], greedy)] * 6, [set()] * 6).token_ids[0]) == 7
    assert int(Sampler()(logits, [_seq([1], [], cases["min_tokens"][0])] + [_seq([1], [], greedy)] * 5,
                         [{7, 31}] + [set()] * 5).token_ids[0]) not in (7, 31)
