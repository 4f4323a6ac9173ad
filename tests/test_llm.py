"""The offline LLM API end to end, with the real runner on tiny checkpoints.

transformers is the reference: greedy tokens must equal its generate(), and
logprobs its log_softmax, token for token.
"""

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from loraplex import LLM, LoRARequest, SamplingParams
from loraplex.errors import ConfigError, InvalidRequestError

PROMPTS = ["Hello", "The capital of France is", "the quick brown fox jumps over the lazy dog. hello", "42"]
MAX_TOKENS = 8
GREEDY = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)


def _hf_greedy(path, prompts, max_new_tokens=MAX_TOKENS):
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(str(path))
    out = []
    for prompt in prompts:
        ids = tok(prompt).input_ids
        gen = model.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=max_new_tokens,
                             min_new_tokens=max_new_tokens, pad_token_id=0)
        out.append(gen[0, len(ids):].tolist())
    return out


@pytest.fixture(scope="module")
def llama(tiny_checkpoint):
    return tiny_checkpoint("llama")


@pytest.fixture(scope="module")
def llm(llama):
    return LLM(model=str(llama), device="cpu", max_model_len=128)


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "granite"])
def test_greedy_matches_transformers(tiny_checkpoint, arch):
    path = tiny_checkpoint(arch)
    outs = LLM(model=str(path), device="cpu").generate(PROMPTS[:2], GREEDY, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == _hf_greedy(path, PROMPTS[:2])
    assert all(o.finished and o.outputs[0].finish_reason == "length" for o in outs)


def test_batch_invariance_alone_vs_mixed_batch(llm, llama):
    alone = [llm.generate(p, GREEDY, use_tqdm=False)[0].outputs[0].token_ids for p in PROMPTS]
    batched = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, GREEDY, use_tqdm=False)]
    assert batched == alone
    assert alone[2] == _hf_greedy(llama, [PROMPTS[2]])[0]


def test_preemption_and_chunked_prefill_give_the_same_tokens(llm, llama):
    short = ["Hello", "42", "the dog", "hi"]                    # 1-3 tokens: all start in one block each
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    expected_short = [o.outputs[0].token_ids for o in llm.generate(short, params, use_tqdm=False)]
    # KV cache of 6 blocks x 8 tokens; the four sequences grow to 2 blocks each.
    block_bytes = 2 * 2 * 8 * 2 * 16 * 4        # K and V, 2 layers, 8 tokens, 2 KV heads x 16, float32
    small = LLM(model=str(llama), device="cpu", max_model_len=48, block_size=8, kv_cache_bytes=6 * block_bytes)
    assert small.llm_engine.block_manager.num_blocks == 6
    outs = small.generate(short, params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == expected_short
    assert small.llm_engine.get_stats().num_preemptions > 0
    assert small.llm_engine.block_manager.num_free_blocks == 6

    expected = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, GREEDY, use_tqdm=False)]
    chunked = LLM(model=str(llama), device="cpu", max_model_len=128, max_num_batched_tokens=4)
    outs = chunked.generate(PROMPTS, GREEDY, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == expected


def test_prompt_forms_and_output_order(llm):
    tok = llm.get_tokenizer()
    ids = tok.encode(PROMPTS[1])
    outs = llm.generate([PROMPTS[1], ids, {"prompt_token_ids": ids}, {"prompt": PROMPTS[1]}], GREEDY,
                        use_tqdm=False)
    assert len({tuple(o.outputs[0].token_ids) for o in outs}) == 1
    assert [o.prompt for o in outs] == [PROMPTS[1], None, None, PROMPTS[1]]
    assert all(o.prompt_token_ids == ids for o in outs)
    single = llm.generate(ids, GREEDY, use_tqdm=False)
    assert len(single) == 1 and single[0].outputs[0].token_ids == outs[0].outputs[0].token_ids
    text = outs[0].outputs[0].text
    assert text == tok.decode(ids + outs[0].outputs[0].token_ids)[len(tok.decode(ids)):]


def test_per_prompt_sampling_params_seeds_and_n(llm):
    params = [SamplingParams(temperature=0, max_tokens=3), SamplingParams(temperature=1.0, seed=3, max_tokens=5, n=2)]
    outs = llm.generate(PROMPTS[:2], params, use_tqdm=False)
    assert len(outs[0].outputs[0].token_ids) == 3 and len(outs[1].outputs) == 2
    again = llm.generate(PROMPTS[1], params[1], use_tqdm=False)[0]
    assert [c.token_ids for c in again.outputs] == [c.token_ids for c in outs[1].outputs]


def test_logprobs_match_transformers_log_softmax(llm, llama):
    params = SamplingParams(temperature=0.8, seed=0, max_tokens=5, logprobs=2, ignore_eos=True)
    out = llm.generate(PROMPTS[1], params, use_tqdm=False)[0]
    completion = out.outputs[0]
    model = AutoModelForCausalLM.from_pretrained(str(llama), dtype=torch.float32).eval()
    ids = out.prompt_token_ids + completion.token_ids
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0]                  # [len, vocab]
    ref = torch.log_softmax(logits, dim=-1)[len(out.prompt_token_ids) - 1:-1]
    for pos, (token, entry) in enumerate(zip(completion.token_ids, completion.logprobs)):
        assert entry[token].logprob == pytest.approx(float(ref[pos, token]), abs=1e-4)
        top_ids = ref[pos].topk(2).indices.tolist()
        assert set(top_ids) <= set(entry)


def test_chat_uses_the_chat_template(llm, llama):
    messages = [{"role": "user", "content": "what is the answer?"}]
    out = llm.chat(messages, GREEDY, use_tqdm=False)[0]
    ref_tok = AutoTokenizer.from_pretrained(str(llama))
    assert out.prompt == ref_tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    direct = llm.generate({"prompt_token_ids": out.prompt_token_ids}, GREEDY, use_tqdm=False)[0]
    assert direct.outputs[0].token_ids == out.outputs[0].token_ids
    assert len(llm.chat([messages, messages], GREEDY, use_tqdm=False)) == 2


def test_bad_requests_fail_clearly_and_the_engine_keeps_serving(llm):
    with pytest.raises(InvalidRequestError, match=r"200 tokens.*max_model_len is 128"):
        llm.generate([list(range(3, 203))], GREEDY, use_tqdm=False)
    with pytest.raises(InvalidRequestError, match="top_p"):
        llm.generate(PROMPTS[0], SamplingParams(top_p=1.5), use_tqdm=False)
    with pytest.raises(InvalidRequestError, match="temperature"):
        SamplingParams(temperature=-1)
    with pytest.raises(InvalidRequestError, match="2 but there are 3 prompts"):
        llm.generate(PROMPTS[:3], [GREEDY, GREEDY], use_tqdm=False)
    with pytest.raises(InvalidRequestError, match="enable_lora=True"):
        llm.generate(PROMPTS[0], GREEDY, lora_request=LoRARequest("a", 1, "/x"), use_tqdm=False)
    with pytest.raises(InvalidRequestError, match="prompt"):
        llm.generate([PROMPTS[0], 3.5], GREEDY, use_tqdm=False)
    assert not llm.llm_engine.has_unfinished_requests()     # nothing half-queued
    assert len(llm.generate(PROMPTS[0], GREEDY, use_tqdm=False)[0].outputs[0].token_ids) == MAX_TOKENS


def test_unknown_llm_argument(llama):
    with pytest.raises(ConfigError, match="unknown LLM argument.*max_num_batched_tokens"):
        LLM(model=str(llama), device="cpu", max_batch_tokens=4)


def test_progress_bar_can_be_switched(llm, capsys):
    llm.generate(PROMPTS[:2], GREEDY, use_tqdm=True)
    assert "Processed prompts" in capsys.readouterr().err
    llm.generate(PROMPTS[:2], GREEDY, use_tqdm=False)
    assert "Processed prompts" not in capsys.readouterr().err
