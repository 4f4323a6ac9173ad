"""Tensor parallelism on the CPU: 2 ranks in 2 processes over gloo, against one device and the references.

Two models: the tiny Llama (4 query heads, 2 KV heads: one KV head per rank), and a GQA
Llama with a single KV head (replicated on both ranks), biases on q/k/v/o and the MLP
(row-parallel biases are added once, after the all-reduce), tied embeddings and a vocab of
301 (not divisible by 2: the last vocab shard is padded). Each serves a mixed batch of base
rows and four PEFT adapters of ranks 4-32 with different targets through 2 slots and 2
CPU-cache entries, so adapters are evicted and reloaded while the batch runs: outputs must
equal one device's and PEFT's, and the other rank's adapter state must mirror rank 0's.

The rank processes start once per model (module-scoped fixture); the failure tests start
their own groups and break them: a rank killed mid-step, a rank that hangs.
"""

from __future__ import annotations

import os
import re
import signal
import time
from dataclasses import dataclass

import pytest
import torch

from lora_reference import ADAPTER_SPECS, peft_model, reference_greedy, write_peft_lora
from runner_helpers import BlockAllocator, decode, new_sequences, prefill, random_prompts, relative_error
from loraplex.core.sequence import ScheduledSeq
from loraplex import LLM, LoRARequest, SamplingParams
from loraplex.errors import TensorParallelError
from server.serve_process import ServeProcess

NUM_TOKENS = 5
PROMPT_LENGTHS = (7, 5, 9, 6, 11, 4, 8)
ROW_ADAPTERS = (None, 0, 1, 2, 3, None, 0)     # index into ADAPTER_SPECS per row; None = base model
MODELS = {
    "llama": dict(arch="llama"),
    "gqa-replicated-kv": dict(arch="llama", num_key_value_heads=1, attention_bias=True, mlp_bias=True,
                              tie_word_embeddings=True, vocab_size=301),
}
# Chunked prefill (16-token steps mix prompt chunks with decodes), 2 slots for 4 adapters.
SETTINGS = dict(enable_lora=True, max_loras=2, max_cpu_loras=2, max_lora_rank=32, dtype="float32", device="cpu",
                block_size=4, max_model_len=64, kv_cache_bytes=1 << 20, max_num_batched_tokens=16,
                distributed_timeout_seconds=60)


@dataclass
class Case:
    model_dir: str
    loras: list[LoRARequest]
    prompts: list[list[int]]
    refs: dict[int, tuple[list[int], torch.Tensor]]    # row -> (PEFT greedy tokens, first logits)
    tp1: LLM
    tp2: LLM

    def row_loras(self, rows=range(len(ROW_ADAPTERS))) -> list[LoRARequest | None]:
        return [None if ROW_ADAPTERS[r] is None else self.loras[ROW_ADAPTERS[r]] for r in rows]


@pytest.fixture(scope="module", params=list(MODELS))
def case(request, tiny_checkpoint, tmp_path_factory):
    kwargs = dict(MODELS[request.param])
    model_dir = tiny_checkpoint(kwargs.pop("arch"), **kwargs)
    root = tmp_path_factory.mktemp(f"tp-{request.param}")
    loras = [LoRARequest(spec.name, i + 1, str(write_peft_lora(model_dir, root / spec.name, spec, seed=i)))
             for i, spec in enumerate(ADAPTER_SPECS)]
    prompts = random_prompts(list(PROMPT_LENGTHS), vocab_size=300, seed=7)
    refs = {}
    for adapter in set(ROW_ADAPTERS):
        model = peft_model(model_dir, None if adapter is None else loras[adapter].lora_path)
        for row, row_adapter in enumerate(ROW_ADAPTERS):
            if row_adapter == adapter:
                refs[row] = reference_greedy(model, prompts[row], NUM_TOKENS)
    tp2 = LLM(str(model_dir), tensor_parallel_size=2, **SETTINGS)
    try:
        yield Case(str(model_dir), loras, prompts, refs, LLM(str(model_dir), **SETTINGS), tp2)
    finally:
        tp2.llm_engine.runner.shutdown()


def greedy(llm: LLM, case: Case) -> list[list[int]]:
    params = SamplingParams(temperature=0.0, max_tokens=NUM_TOKENS, ignore_eos=True)
    outputs = llm.generate([{"prompt_token_ids": p} for p in case.prompts], params,
                           lora_request=case.row_loras(), use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outputs]


def assert_mirrored(llm: LLM) -> dict:
    """The other rank's CPU cache and slots hold what rank 0's manager put in its own."""
    runner = llm.llm_engine.runner
    rank0 = runner.lora_state()
    (rank1,) = runner.report()
    assert {k: rank1[k] for k in rank0} == rank0
    assert rank1["unmirrored_loads"] == 0
    assert rank1["slot_ranks"] == runner.lora.stacks.slot_ranks.tolist()
    return rank0


def test_greedy_outputs_equal_one_device_and_peft(case):
    expected = [case.refs[row][0] for row in range(len(ROW_ADAPTERS))]
    # Overlapped scheduling under tensor parallelism: the pending ids are broadcast to rank 1.
    assert case.tp2.llm_engine.core.async_scheduling
    assert greedy(case.tp1, case) == expected
    assert greedy(case.tp2, case) == expected
    stats = case.tp2.llm_engine.lora_manager.stats
    assert stats["device_evictions"] >= 2 and stats["cpu_misses"] >= 2   # slots reused, reloads from disk
    state = assert_mirrored(case.tp2)
    assert len(state["cached"]) == 2 and len(state["slots"]) == 2


def test_prompt_logprobs_and_token_controls_equal_one_device(case):
    """prompt_logprobs (prompt positions' logits returned over 16-token chunks and gathered from both
    ranks), logit_bias and allowed_token_ids: the same on two ranks as on one device."""
    params = SamplingParams(temperature=0.8, seed=3, max_tokens=6, ignore_eos=True, prompt_logprobs=2, logprobs=1,
                            logit_bias={5: 4.0}, allowed_token_ids=list(range(3, 120)))
    rows = range(3)
    runs = []
    for llm in (case.tp1, case.tp2):
        outputs = llm.generate([{"prompt_token_ids": case.prompts[r]} for r in rows], params,
                               lora_request=case.row_loras(rows), use_tqdm=False)
        runs.append(outputs)
    for one, two in zip(*runs):
        assert one.outputs[0].token_ids == two.outputs[0].token_ids
        assert set(one.outputs[0].token_ids) <= set(range(3, 120))
        assert len(two.prompt_logprobs) == len(two.prompt_token_ids) and two.prompt_logprobs[0] is None
        for a, b in zip(one.prompt_logprobs[1:], two.prompt_logprobs[1:]):
            assert a.keys() == b.keys()
            assert [lp.logprob for lp in a.values()] == pytest.approx([lp.logprob for lp in b.values()], abs=1e-4)


def test_logits_equal_one_device(case):
    """Runner-level steps (a mixed prefill, then decodes) on both; adapters rotate through the 2 slots."""
    for rows in ((0, 1, 2, 5), (3, 4), (1, 6, 2)):
        outs = []
        for llm in (case.tp1, case.tp2):
            runner = llm.llm_engine.runner
            allocator = BlockAllocator(runner.num_kv_blocks, runner.block_size, seed=4)
            seqs = new_sequences([case.prompts[r] for r in rows], loras=case.row_loras(rows))
            logits = [prefill(runner, allocator, seqs)]
            for _ in range(3):
                logits.append(decode(runner, allocator, seqs, logits[-1]))
            outs.append(logits)
        for one, two in zip(*outs):
            assert relative_error(two, one) < 1e-5
        for row, first in zip(rows, outs[1][0]):
            assert relative_error(first, case.refs[row][1]) < 1e-4, f"row {row}"
    assert_mirrored(case.tp2)


def test_pending_input_ids_reach_every_rank(case):
    """A decode step whose input ids are still on the device (overlapped scheduling: the
    previous step's sampled ids, in a permuted order) gives the logits of the same step with
    the ids known on the host, on one device and over two ranks."""
    rows = (0, 1, 5, 6)
    outs = []
    for llm in (case.tp1, case.tp2):
        runner = llm.llm_engine.runner
        allocator = BlockAllocator(runner.num_kv_blocks, runner.block_size, seed=5)
        seqs = new_sequences([case.prompts[r] for r in rows], loras=case.row_loras(rows))
        first = prefill(runner, allocator, seqs)
        sampled = first.argmax(-1).flip(0)              # row i of the step's ids is sequence n-1-i's
        scheduled = []
        for i, seq in enumerate(seqs):
            seq.num_pending_tokens, seq.pending_row = 1, len(seqs) - 1 - i
            allocator.ensure(seq, seq.num_tokens)
            scheduled.append(ScheduledSeq(seq, 1))
        pending = runner.execute(scheduled, sampled)
        for seq, token in zip(seqs, first.argmax(-1).tolist()):
            seq.num_pending_tokens, seq.pending_row = 0, -1
            seq.token_ids.append(token)
            seq.num_computed_tokens += 1
        outs.append((first, pending, decode(runner, allocator, seqs, pending)))
    (first1, pending1, next1), (first2, pending2, next2) = outs
    # The host-side reference: the same decode step with its ids appended on the host.
    reference = new_sequences([case.prompts[r] for r in rows], loras=case.row_loras(rows))
    runner = case.tp1.llm_engine.runner
    allocator = BlockAllocator(runner.num_kv_blocks, runner.block_size, seed=6)
    prefill(runner, allocator, reference)
    assert relative_error(decode(runner, allocator, reference, first1), pending1) < 1e-6
    assert relative_error(pending2, pending1) < 1e-5 and relative_error(next2, next1) < 1e-5


def test_pin_and_remove_are_mirrored(case):
    llm, lora = case.tp2, case.loras[2]
    llm.add_lora(lora)
    assert llm.pin_lora(lora.lora_int_id)
    assert lora.lora_int_id in assert_mirrored(llm)["cached"]
    # The other adapters rotate through the one slot left; the pinned one keeps its slot.
    assert greedy(llm, case) == [case.refs[row][0] for row in range(len(ROW_ADAPTERS))]
    state = assert_mirrored(llm)
    assert lora.lora_int_id in state["cached"] and lora.lora_int_id in state["slots"].values()
    assert llm.remove_lora(lora.lora_int_id)
    state = assert_mirrored(llm)
    assert lora.lora_int_id not in state["cached"] and lora.lora_int_id not in state["slots"].values()


TIMEOUT_S = 5.0
FAILURE_SETTINGS = dict(dtype="float32", device="cpu", block_size=4, max_model_len=64, kv_cache_bytes=1 << 20,
                        distributed_timeout_seconds=TIMEOUT_S)


def generate_once(llm: LLM):
    return llm.generate({"prompt_token_ids": [5, 6, 7]}, SamplingParams(temperature=0.0, max_tokens=4),
                        use_tqdm=False)


def test_a_rank_killed_mid_step_stops_the_engine_at_once(tiny_checkpoint):
    llm = LLM(str(tiny_checkpoint()), tensor_parallel_size=2, **FAILURE_SETTINGS)
    runner = llm.llm_engine.runner
    (worker,) = runner._processes
    generate_once(llm)
    # Rank 1 dies after it got the step and before the forward's first collective on rank 0.
    run, killed_at = runner.local.run, []

    def run_and_kill(host, *args):
        os.kill(worker.pid, signal.SIGKILL)
        killed_at.append(time.monotonic())
        return run(host, *args)

    runner.local.run = run_and_kill
    with pytest.raises(TensorParallelError, match=rf"rank 1 \(pid {worker.pid}\) was killed by SIGKILL; "
                                                  r"the engine cannot continue, restart it"):
        generate_once(llm)
    assert time.monotonic() - killed_at[0] < TIMEOUT_S
    # Dead for good: later calls raise at once, nothing is left running.
    start = time.monotonic()
    with pytest.raises(TensorParallelError, match="killed by SIGKILL"):
        generate_once(llm)
    assert time.monotonic() - start < 1.0 and not worker.is_alive()


def test_a_hung_rank_stops_the_engine_after_the_timeout(tiny_checkpoint):
    llm = LLM(str(tiny_checkpoint()), tensor_parallel_size=2, **FAILURE_SETTINGS)
    runner = llm.llm_engine.runner
    (worker,) = runner._processes
    generate_once(llm)
    os.kill(worker.pid, signal.SIGSTOP)   # alive, but never answers
    try:
        start = time.monotonic()
        with pytest.raises(TensorParallelError, match=r"a step did not finish within "
                                                      r"distributed_timeout_seconds=5 \(a rank hangs\)"):
            generate_once(llm)
        assert TIMEOUT_S - 0.5 < time.monotonic() - start < TIMEOUT_S + 5
        worker.join(5)
        assert not worker.is_alive()      # the broken group's ranks are killed
    finally:
        if worker.is_alive():
            worker.kill()


def test_a_failing_rank_reports_its_error(tiny_checkpoint):
    """A rank that raises sends its error to rank 0 before it exits: the engine's error names both."""
    llm = LLM(str(tiny_checkpoint()), tensor_parallel_size=2, **FAILURE_SETTINGS)
    runner = llm.llm_engine.runner
    (worker,) = runner._processes
    runner._channel.send(("slot", 0, None))   # a LoRA message to a rank without LoRA: it raises
    worker.join(60)   # generous: on a loaded CI machine the exit can take longer than TIMEOUT_S
    with pytest.raises(TensorParallelError, match=rf"rank 1 \(pid {worker.pid}\) exited with status 1: RuntimeError: "
                                                  r"rank 1 got 'slot' but LoRA is not enabled"):
        generate_once(llm)


def test_serve_with_tensor_parallel_size_2(tiny_checkpoint, tmp_path):
    from adapters import write_peft_adapter
    ckpt = str(tiny_checkpoint())
    adapter = write_peft_adapter(tmp_path / "a", seed=3, base_model_name_or_path=ckpt)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VLLM_", "LORAPLEX_"))}
    server = ServeProcess([ckpt, "--tensor-parallel-size", "2", "--device", "cpu", "--enable-lora",
                           "--lora-modules", f"a={adapter}", "--max-model-len", "64", "--host", "127.0.0.1"],
                          env, tmp_path / "server.log")
    try:
        server.wait_ready(timeout_s=240)
        import httpx
        answers = {}
        for model in ("a", ckpt):
            r = httpx.post(server.base_url + "/v1/completions", timeout=60,
                           json={"model": model, "prompt": "hello world", "max_tokens": 8, "temperature": 0})
            assert r.status_code == 200, r.text
            answers[model] = r.json()["choices"][0]["text"]
        reference = LLM(ckpt, enable_lora=True, device="cpu", max_model_len=64)
        params = SamplingParams(temperature=0, max_tokens=8)
        assert answers["a"] == reference.generate("hello world", params, lora_request=LoRARequest("a", 1, str(adapter)),
                                                  use_tqdm=False)[0].outputs[0].text
        assert answers[ckpt] == reference.generate("hello world", params, use_tqdm=False)[0].outputs[0].text
        log = server.log_path.read_text()
        # The ranks are children of the engine process, itself spawned by the API server (it
        # must not be daemonic: a daemonic process cannot start processes).
        assert re.search(r"engine loop: engine process \d+", log), log
        (pid,) = re.search(r"tensor parallelism: 2 ranks \(gloo\), ranks 1-1 in processes \[(\d+)\]", log).groups()
        server.proc.send_signal(signal.SIGTERM)
        assert server.proc.wait(60) == 0
        # The engine process stopped its ranks and exited by itself (it waited for them, 30 s).
        assert "did not stop in time" not in server.log_path.read_text(), server.log_path.read_text()
        deadline = time.monotonic() + 15
        while _alive(int(pid)) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _alive(int(pid)), "rank 1 outlived the server"
    finally:
        server.stop()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (exited, not yet reaped by its parent) counts as gone.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] != "Z"
    except FileNotFoundError:
        return False
