"""Prefix caching: requests share the computed blocks of a common prompt prefix (per adapter and
version of its weights, per media for multimodal prompts, and per cache_salt), and every output is
token for token what it is without the cache."""

import pytest

from loraplex import LLM, LoRARequest, SamplingParams
from loraplex.core.block_manager import BlockManager
from loraplex.core.sequence import Sequence
from loraplex.demo import demo_adapters_dir, demo_model_path
from loraplex.lora_request import lora_id_for_name

BS = 4


def seq(tokens, salt=(), seq_id=0):
    s = Sequence(seq_id=seq_id, token_ids=list(tokens), num_prompt_tokens=len(tokens))
    s.cache_salt = salt
    return s


def run_prompt(bm, s):
    """Admit `s` as the scheduler does, compute its whole prompt and register what it computed."""
    bm.reuse_prefix(s)
    bm.allocate(s, s.num_tokens)
    bm.register_prefix(s, s.num_tokens)
    s.num_computed_tokens = s.num_tokens
    return s


def test_a_shared_prefix_is_reused_and_reference_counted():
    bm = BlockManager(16, BS, enable_prefix_caching=True)
    a = run_prompt(bm, seq(range(10)))                             # blocks [0-3] [4-7] and a partial one
    b = seq(list(range(8)) + [99, 98, 97])
    assert bm.reuse_prefix(b) == 8 and b.block_table == a.block_table[:2]
    bm.allocate(b, b.num_tokens)
    assert bm.num_used_blocks == 3 + 1                            # b added one block of its own
    bm.free(a)
    assert bm.num_used_blocks == 3                                # the shared two are still b's
    bm.free(b)
    assert bm.num_used_blocks == 0 and bm.num_free_blocks == 16   # cached blocks count as free
    c = seq(list(range(8)) + [5])
    assert bm.reuse_prefix(c) == 8                                # still cached after everyone left
    assert (bm.num_prefix_hits, bm.num_prefix_queries) == (16, 10 + 11 + 9)


def test_no_reuse_across_salts_or_different_tokens_or_without_the_option():
    bm = BlockManager(16, BS, enable_prefix_caching=True)
    run_prompt(bm, seq(range(9), salt=(7, 1)))
    assert bm.reuse_prefix(seq(range(9), salt=(7, 2))) == 0      # the adapter's weights changed
    assert bm.reuse_prefix(seq(range(9), salt=())) == 0          # the base model
    assert bm.reuse_prefix(seq([0, 1, 2, 3, 4, 5, 6, 0, 8], salt=(7, 1))) == 4   # the second block differs
    assert bm.reuse_prefix(seq(range(9), salt=None)) == 0        # a sequence kept out of the cache
    off = BlockManager(16, BS)
    run_prompt(off, seq(range(9)))
    assert off.reuse_prefix(seq(range(9))) == 0


def test_the_prompts_last_token_is_always_computed():
    bm = BlockManager(16, BS, enable_prefix_caching=True)
    run_prompt(bm, seq(range(8)))
    again = seq(range(8))
    assert bm.reuse_prefix(again) == 4                           # not 8: the last block is computed again
    assert bm.num_missing_blocks(again, 8) == 1


def test_cached_blocks_are_evicted_least_recently_freed_first_when_blocks_run_out():
    bm = BlockManager(4, BS, enable_prefix_caching=True)
    bm.free(run_prompt(bm, seq(range(9))))                       # 2 registered blocks cached, 1 free block
    hog = seq(range(100, 112), seq_id=1)
    bm.allocate(hog, 12)                                         # 3 blocks: the free ones, then an eviction
    assert bm.num_free_blocks == 1
    assert bm.reuse_prefix(seq(range(9))) == 4                   # the prefix's tail went first, its head stayed


@pytest.fixture(scope="module")
def adapters():
    return {name: LoRARequest(name, lora_id_for_name(name), str(demo_adapters_dir() / name))
            for name in ("upper", "reverse")}


def demo_llm(prefix_caching: bool, **kwargs) -> LLM:
    kwargs.setdefault("max_num_seqs", 6)
    return LLM(str(demo_model_path()), device="cpu", enable_lora=True, max_loras=2, max_lora_rank=32,
               enable_prefix_caching=prefix_caching, block_size=8, **kwargs)


SYSTEM = "Input: " + "the quick brown fox jumps over the lazy dog. " * 2


def test_outputs_equal_those_without_the_cache_and_prefixes_are_reused(adapters):
    prompts = [SYSTEM + f"item {i}\nOutput: " for i in range(12)] + ["Input: short\nOutput: "]
    loras = [[None, adapters["upper"], adapters["reverse"]][i % 3] for i in range(len(prompts))]
    greedy = SamplingParams(temperature=0, max_tokens=10)
    sampled = SamplingParams(temperature=1.0, seed=5, n=2, max_tokens=6)
    results = {}
    for cached in (False, True):
        llm = demo_llm(cached)
        outs = [llm.generate(prompts, greedy, lora_request=loras, use_tqdm=False),
                llm.generate(prompts, greedy, lora_request=loras, use_tqdm=False),   # all of it cached now
                llm.generate(prompts[:4], sampled, lora_request=loras[:4], use_tqdm=False),
                llm.generate(prompts[0], SamplingParams(temperature=0, max_tokens=2, prompt_logprobs=1),
                             use_tqdm=False)]
        results[cached] = [[[c.token_ids for c in o.outputs] for o in batch] for batch in outs]
        results[cached].append([[round(e[t].logprob, 4) for t in e] for e in outs[3][0].prompt_logprobs[1:]])
        manager = llm.llm_engine.block_manager
        if cached:
            assert manager.num_prefix_hits > manager.num_prefix_queries / 2
    assert results[True] == results[False]
    assert results[False][0] == results[False][1]


def test_preemption_and_eviction_under_a_small_cache_keep_the_outputs(adapters):
    prompts = [SYSTEM + f"question {i}\nOutput: " for i in range(10)]
    loras = [adapters["upper"] if i % 2 else None for i in range(len(prompts))]
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    expected = [o.outputs[0].token_ids for o in demo_llm(False).generate(prompts, params, lora_request=loras,
                                                                          use_tqdm=False)]
    # 40 blocks of 8 tokens (the demo: 6 layers, 4 KV heads of 16 float32s, keys and values) cannot
    # hold six sequences of about 140 tokens even with their 12-block prefix shared.
    llm = demo_llm(True, kv_cache_bytes=40 * 8 * 2 * 6 * 4 * 16 * 4)
    assert llm.llm_engine.block_manager.num_blocks == 40
    for _ in range(2):
        got = [o.outputs[0].token_ids for o in llm.generate(prompts, params, lora_request=loras, use_tqdm=False)]
        assert got == expected
    assert llm.llm_engine.scheduler.num_preemptions > 0 and llm.llm_engine.block_manager.num_prefix_hits > 0


def test_prompts_admitted_in_the_same_step_share_what_the_first_computes(adapters):
    """One LLM.generate call, every request admitted in its first step: all but the first of each
    adapter find the shared prefix (written by the first within the same forward pass)."""
    prompts = [SYSTEM + f"same step {i}\nOutput: " for i in range(6)]
    params = SamplingParams(temperature=0, max_tokens=6)
    llm = demo_llm(True, max_num_seqs=8)
    got = [o.outputs[0].token_ids for o in llm.generate(prompts, params, lora_request=adapters["upper"],
                                                         use_tqdm=False)]
    assert llm.llm_engine.get_stats().num_steps == 6                         # all six ran from step one
    full_blocks = (len(llm.get_tokenizer().encode(SYSTEM)) - 1) // 8
    assert llm.llm_engine.block_manager.num_prefix_hits >= 5 * full_blocks * 8
    plain = demo_llm(False, max_num_seqs=8)
    assert got == [o.outputs[0].token_ids for o in plain.generate(prompts, params, lora_request=adapters["upper"],
                                                                   use_tqdm=False)]


def test_the_next_turn_of_a_conversation_reuses_the_previous_answers_blocks(adapters):
    first = SYSTEM + "turn one\nOutput: "
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    llm = demo_llm(True)
    turn1 = llm.generate(first, params, lora_request=adapters["upper"], use_tqdm=False)[0]
    follow_up = turn1.prompt_token_ids + turn1.outputs[0].token_ids + llm.get_tokenizer().encode(
        "\nInput: and now?\nOutput: ", add_special_tokens=False)
    manager = llm.llm_engine.block_manager
    hits = manager.num_prefix_hits
    turn2 = llm.generate({"prompt_token_ids": follow_up}, params, lora_request=adapters["upper"], use_tqdm=False)[0]
    reused = manager.num_prefix_hits - hits
    # Beyond the first prompt's full blocks: the answer's blocks (known and computed) were cached too.
    assert reused > len(turn1.prompt_token_ids) // 8 * 8 and reused % 8 == 0
    plain = demo_llm(False).generate({"prompt_token_ids": follow_up}, params, lora_request=adapters["upper"],
                                     use_tqdm=False)[0]
    assert turn2.outputs[0].token_ids == plain.outputs[0].token_ids


def test_an_adapter_reloaded_in_place_does_not_reuse_blocks_of_its_old_weights(adapters):
    """Same name and id, new weights (vLLM's load_inplace): the prompt is computed again."""
    prompt = SYSTEM + "again\nOutput: "
    params = SamplingParams(temperature=0, max_tokens=12)
    upper, reverse = adapters["upper"], adapters["reverse"]
    as_reverse = LoRARequest("upper", upper.lora_int_id, reverse.lora_path, load_inplace=True)
    llm = demo_llm(True)
    first = llm.generate(prompt, params, lora_request=upper, use_tqdm=False)[0].outputs[0].token_ids
    hits = llm.llm_engine.block_manager.num_prefix_hits
    second = llm.generate(prompt, params, lora_request=as_reverse, use_tqdm=False)[0].outputs[0].token_ids
    assert llm.llm_engine.block_manager.num_prefix_hits == hits          # nothing reused across versions
    fresh = demo_llm(False).generate(prompt, params, lora_request=reverse, use_tqdm=False)[0].outputs[0].token_ids
    assert second == fresh != first


def test_multimodal_prompts_share_blocks_only_with_the_same_media(tiny_llava):
    """The same prompt text with another image: the placeholders are the same tokens, the answer not.
    With the same image again, the cached blocks (image included) are reused and not re-encoded."""
    from mm_models import random_image

    text = "USER: <image>\nwhat is in the picture? ASSISTANT:"
    params = SamplingParams(temperature=0, max_tokens=8)
    one, two = random_image(1), random_image(2, (30, 60))
    prompts = [{"prompt": text, "multi_modal_data": {"image": image}} for image in (one, one, two)]
    plain = LLM(model=str(tiny_llava), device="cpu", max_model_len=128, block_size=4)
    cached = LLM(model=str(tiny_llava), device="cpu", max_model_len=128, block_size=4, enable_prefix_caching=True)
    expected = [plain.generate(p, params, use_tqdm=False)[0].outputs[0].token_ids for p in prompts]
    manager = cached.llm_engine.block_manager
    got, hits = [], []
    for p in prompts:
        got.append(cached.generate(p, params, use_tqdm=False)[0].outputs[0].token_ids)
        hits.append(manager.num_prefix_hits)
    assert got == expected and expected[0] != expected[2]
    assert hits[0] == 0 and hits[1] > 0 and hits[2] == hits[1]      # the other image found nothing
    assert cached.llm_engine.runner.mm_encoder.num_items_encoded == 2   # the repeated image: not again


def test_a_cache_salt_keeps_requests_from_sharing_blocks_with_other_salts():
    llm = demo_llm(True)
    manager = llm.llm_engine.block_manager
    greedy = SamplingParams(temperature=0, max_tokens=4)
    prompt = SYSTEM + "salted\nOutput: "

    def hits(prompt_or_dict):
        before = manager.num_prefix_hits
        out = llm.generate(prompt_or_dict, greedy, use_tqdm=False)[0].outputs[0].token_ids
        return manager.num_prefix_hits - before, out

    first = hits(prompt)
    assert first[0] == 0
    assert hits({"prompt": prompt, "cache_salt": "a"}) == (0, first[1])
    assert hits({"prompt": prompt, "cache_salt": "b"}) == (0, first[1])
    reused, out = hits({"prompt": prompt, "cache_salt": "a"})
    assert reused > 0 and out == first[1]
    assert hits(prompt)[0] == reused                   # no salt: the unsalted blocks
    with pytest.raises(Exception, match="cache_salt must be a non-empty string"):
        llm.generate({"prompt": prompt, "cache_salt": ""}, greedy, use_tqdm=False)


def test_the_server_flag_turns_it_on_and_metrics_count_the_hits():
    import httpx
    import openai
    from prometheus_client.parser import text_string_to_metric_families

    from server.real_server import real_server

    def hits_and_queries(url):
        families = {f.name: f for f in text_string_to_metric_families(httpx.get(url + "/metrics").text)}
        return tuple(families[f"loraplex_prefix_cache_{k}"].samples[0].value for k in ("hits", "queries"))

    prompt = SYSTEM + "served\nOutput: "
    answers = {}
    for flag in ("--no-enable-prefix-caching", "--enable-prefix-caching"):
        with real_server(["serve", str(demo_model_path()), "--served-model-name", "demo", flag], {}) as server:
            client = openai.OpenAI(base_url=server.base_url + "/v1", api_key="none", max_retries=0)
            answers[flag] = [client.completions.create(model="demo", prompt=prompt, max_tokens=8,
                                                       temperature=0).choices[0].text for _ in range(2)]
            counts = hits_and_queries(server.base_url)
            # A request with a cache_salt shares blocks only with requests of the same salt.
            for salt, shares in (("tenant-a", False), ("tenant-a", True), ("tenant-b", False)):
                answers[flag].append(client.completions.create(model="demo", prompt=prompt, max_tokens=8, temperature=0,
                                                               extra_body={"cache_salt": salt}).choices[0].text)
                salted = hits_and_queries(server.base_url)
                if flag == "--enable-prefix-caching":
                    assert (salted[0] > counts[0]) == shares, (salt, counts, salted)
                counts = salted
        if flag == "--enable-prefix-caching":
            assert 0 < counts[0] < counts[1]       # the second request found the first one's blocks
        else:
            assert counts == (0, 0)
    assert answers["--enable-prefix-caching"] == answers["--no-enable-prefix-caching"]


def test_a_step_that_did_not_run_leaves_nothing_unwritten_in_the_cache():
    """A admitted, B admitted after it in the same step sharing the blocks A is to compute; the
    step fails to launch (an adapter failed to reload) and A is aborted before the retry: B must
    not find A's never-written blocks, and A's requeued twin state must be clean."""
    from loraplex.core.scheduler import Scheduler
    from loraplex.core.sequence import SequenceStatus

    bm = BlockManager(32, BS, enable_prefix_caching=True)
    scheduler = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=64)
    a, b = seq(range(13), seq_id=0), seq(list(range(12)) + [77], seq_id=1)
    b.arrival_index = 1
    scheduler.add(a)
    scheduler.add(b)
    plan = scheduler.schedule()
    assert [s.seq for s in plan.scheduled] == [a, b] and b.num_computed_tokens == 12   # shared in-step
    scheduler.unschedule(plan)                        # the launch failed
    assert list(scheduler.waiting) == [a, b] and not scheduler.running
    assert a.status is b.status is SequenceStatus.WAITING and a.block_table == b.block_table == []
    scheduler.finish(a)                               # aborted before the retry
    retry = scheduler.schedule()
    assert [s.seq for s in retry.scheduled] == [b] and b.num_computed_tokens == 0
    assert [s.num_new_tokens for s in retry.scheduled] == [13]
    assert bm.num_used_blocks == 4 and bm.num_free_blocks == 28
