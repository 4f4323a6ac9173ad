"""TritonAttentionBackend in the model runner (through the interpreter) equals the torch path;
the backend and load_format settings are validated."""

import pytest
import torch
from runner_helpers import (BlockAllocator, decode, make_runner, new_sequences, prefill, random_prompts, relative_error,
                            step)

from loraplex.core.attention import AttentionMetadata, TorchAttentionBackend, get_attention_backend
from loraplex.core.config import EngineConfig
from loraplex.core.sequence import ScheduledSeq
from loraplex.core.triton_attention_backend import TritonAttentionBackend
from loraplex.errors import ConfigError


@pytest.mark.parametrize("arch_kwargs", [dict(arch="llama"), dict(arch="mistral", sliding_window=6)])
def test_runner_with_triton_backend_matches_torch(tiny_checkpoint, arch_kwargs):
    path = tiny_checkpoint(**arch_kwargs)
    runners = {name: make_runner(path, attention_backend=name) for name in ("torch", "triton")}
    assert runners["triton"].attention_backend.name == "triton"
    prompts = random_prompts([9, 1, 14], runners["torch"].vocab_size, seed=5)
    results = {}
    for name, runner in runners.items():
        allocator, seqs = BlockAllocator(runner.num_kv_blocks, runner.block_size, seed=1), new_sequences(prompts)
        logits = [prefill(runner, allocator, seqs)]
        for _ in range(3):
            logits.append(decode(runner, allocator, seqs, logits[-1]))
        results[name] = logits, [s.token_ids for s in seqs]
    for ours, ref in zip(results["triton"][0], results["torch"][0]):
        assert relative_error(ours, ref) < 1e-4
    assert results["triton"][1] == results["torch"][1]


@pytest.mark.parametrize("min_split", [1, 64])
def test_mixed_step_with_leading_decodes_matches_torch(tiny_checkpoint, monkeypatch, min_split):
    # Three sequences decode while a prompt and a second chunk of another arrive: with the split
    # (min_split 1) the decodes go to the decode kernel, without it all to the prefill kernel.
    from loraplex.core import triton_attention_backend
    monkeypatch.setattr(triton_attention_backend, "MIN_SPLIT_DECODES", min_split)
    path = tiny_checkpoint(arch="mistral", sliding_window=6)
    results = {}
    for name in ("torch", "triton"):
        runner = make_runner(path, attention_backend=name)
        allocator = BlockAllocator(runner.num_kv_blocks, runner.block_size, seed=2)
        running = new_sequences(random_prompts([7, 12, 3], runner.vocab_size, seed=3))
        prefill(runner, allocator, running)
        for seq in running:
            seq.token_ids.append(5)
        chunked, fresh = new_sequences(random_prompts([10, 9], runner.vocab_size, seed=4), first_id=3)
        step(runner, allocator, [chunked], [4])                    # its first chunk
        seqs, num_new = running + [chunked, fresh], [1, 1, 1, 6, 9]
        for seq, n in zip(seqs, num_new):
            allocator.ensure(seq, seq.num_computed_tokens + n)
        host = runner._host_inputs([ScheduledSeq(s, n) for s, n in zip(seqs, num_new)])
        assert host.attention_metadata(runner.device).num_leading_decodes == 3
        results[name] = step(runner, allocator, seqs, num_new)
    assert relative_error(results["triton"], results["torch"]) < 1e-4


@pytest.mark.parametrize("min_split", [1, 64])
@pytest.mark.parametrize("query_lens", [[1, 1, 1, 5], [1, 1, 1]])
def test_backends_write_into_out(monkeypatch, min_split, query_lens):
    # Mixed-step graphs hand the backend their static output buffer: what it returns is that
    # buffer, holding what a new tensor would (decode-only and mixed, split or not).
    from loraplex.core import triton_attention_backend
    monkeypatch.setattr(triton_attention_backend, "MIN_SPLIT_DECODES", min_split)
    gen = torch.Generator().manual_seed(0)
    cached = [3, 7, 0, 2][:len(query_lens)]
    k_cache, v_cache = (torch.randn(12, 4, 2, 16, generator=gen) for _ in range(2))
    tokens = sum(query_lens)
    q = torch.randn(tokens, 4, 16, generator=gen)
    k, v = (torch.randn(tokens, 2, 16, generator=gen) for _ in range(2))
    starts = [0] + torch.tensor(query_lens).cumsum(0).tolist()
    metadata = AttentionMetadata(
        slot_mapping=torch.full((tokens,), -1, dtype=torch.int64),        # writes nothing
        query_start_loc=torch.tensor(starts, dtype=torch.int32),
        seq_lens=torch.tensor([c + n for c, n in zip(cached, query_lens)], dtype=torch.int32),
        block_tables=torch.arange(12, dtype=torch.int32).view(4, 3)[:len(query_lens)].contiguous(),
        logits_indices=torch.tensor(starts[1:], dtype=torch.int64) - 1, max_query_len=max(query_lens),
        max_seq_len=12, is_decode_only=max(query_lens) == 1, num_leading_decodes=3)
    expected = TorchAttentionBackend().forward(q, k, v, k_cache, v_cache, metadata, scale=0.3, sliding_window=None)
    for backend in (TorchAttentionBackend(), TritonAttentionBackend()):
        out = torch.full_like(q, float("nan"))
        result = backend.forward(q, k, v, k_cache, v_cache, metadata, scale=0.3, sliding_window=None, out=out)
        assert result.data_ptr() == out.data_ptr(), backend.name
        torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)


def test_backend_selection():
    assert isinstance(get_attention_backend(torch.device("cpu")), TorchAttentionBackend)
    assert isinstance(get_attention_backend(torch.device("cpu"), "triton"), TritonAttentionBackend)
    assert isinstance(get_attention_backend(torch.device("cuda"), "torch"), TorchAttentionBackend)


def test_settings_are_validated():
    with pytest.raises(ConfigError, match="attention_backend"):
        EngineConfig(model="m", attention_backend="flash")
    with pytest.raises(ConfigError, match="load_format"):
        EngineConfig(model="m", load_format="random")


def test_dummy_load_format_needs_only_config_json(tiny_checkpoint, tmp_path):
    source = tiny_checkpoint()
    (tmp_path / "config.json").write_text((source / "config.json").read_text())
    runner = make_runner(tmp_path, load_format="dummy")
    weights = [p for p in runner.model.parameters()]
    assert all(torch.isfinite(p).all() and p.std() > 0 for p in weights if p.dim() == 2)
    allocator, seqs = BlockAllocator(runner.num_kv_blocks, runner.block_size), new_sequences([[5, 6, 7]])
    logits = prefill(runner, allocator, seqs)
    assert logits.shape == (1, runner.vocab_size) and torch.isfinite(logits).all()


def test_warm_up_with_the_triton_backend_leaves_the_cache_alone(tiny_checkpoint):
    # On CUDA the warm-up is what compiles the kernels; here (interpreter) it must run the same
    # launches, decode splits included, and write nothing.
    from loraplex.core.warmup import warm_up
    runner = make_runner(tiny_checkpoint(arch="mistral", sliding_window=6), attention_backend="triton",
                         max_num_batched_tokens=8)
    gen = torch.Generator().manual_seed(0)
    for k_cache, v_cache in runner.kv_cache.layers:
        k_cache.copy_(torch.randn(k_cache.shape, generator=gen))
        v_cache.copy_(torch.randn(v_cache.shape, generator=gen))
    caches = [(k.clone(), v.clone()) for k, v in runner.kv_cache.layers]
    warm_up(runner)
    assert all(torch.equal(k, k0) and torch.equal(v, v0) for (k, v), (k0, v0) in zip(runner.kv_cache.layers, caches))
