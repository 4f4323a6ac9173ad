"""The Triton attention launchers reject bad arguments with KernelArgumentError saying what to fix."""

import pytest
import torch

from loraplex.errors import KernelArgumentError
from loraplex.kernels.triton_attention import triton_paged_decode, triton_paged_prefill, triton_write_kv_cache


def _args():
    k_cache = torch.randn(4, 8, 2, 16)
    v_cache = torch.randn(4, 8, 2, 16)
    q = torch.randn(2, 4, 16)
    tables = torch.tensor([[0, 1], [2, 3]], dtype=torch.int32)
    seq_lens = torch.tensor([5, 9], dtype=torch.int32)
    qsl = torch.tensor([0, 1, 2], dtype=torch.int32)
    return q, k_cache, v_cache, tables, seq_lens, qsl


@pytest.mark.parametrize("change,message", [
    (lambda a: a.update(q=a["q"].half()), "share a dtype"),
    (lambda a: a.update(q=torch.randn(2, 3, 16)), "multiple of the cache's 2 KV heads"),
    (lambda a: a.update(q=torch.randn(2, 4, 32)[:, :, ::2]), "contiguous last dimension"),
    (lambda a: a.update(q=torch.randn(2, 4, 8)), "head_dim 8 differs"),
    (lambda a: a.update(block_tables=a["block_tables"].long()), "block_tables must be a 2-D int32"),
    (lambda a: a.update(seq_lens=a["seq_lens"][:1]), "block_tables has 2 rows for 1 sequences"),
    (lambda a: a.update(v_cache=torch.randn(4, 8, 2, 16).half()), "one shape, dtype and strides"),
    (lambda a: a.update(sliding_window=0), "sliding_window must be None or an int >= 1"),
    (lambda a: a.update(num_splits=0), "num_splits must be an int"),
])
def test_decode_argument_errors(change, message):
    q, k_cache, v_cache, tables, seq_lens, _ = _args()
    args = dict(q=q, k_cache=k_cache, v_cache=v_cache, block_tables=tables, seq_lens=seq_lens)
    change(args)
    extra = {k: args.pop(k) for k in ("sliding_window", "num_splits") if k in args}
    with pytest.raises(KernelArgumentError, match=message):
        triton_paged_decode(args["q"], args["k_cache"], args["v_cache"], args["block_tables"], args["seq_lens"],
                            0.25, **extra)


def test_decode_needs_one_token_per_sequence():
    q, k_cache, v_cache, tables, seq_lens, _ = _args()
    with pytest.raises(KernelArgumentError, match="one query token per sequence"):
        triton_paged_decode(torch.randn(3, 4, 16), k_cache, v_cache, tables, seq_lens, 0.25)


def test_prefill_argument_errors():
    q, k_cache, v_cache, tables, seq_lens, qsl = _args()
    with pytest.raises(KernelArgumentError, match=r"query_start_loc must be \[num_seqs \+ 1\]"):
        triton_paged_prefill(q, k_cache, v_cache, tables, qsl[:2], seq_lens, 0.25, max_query_len=1)
    with pytest.raises(KernelArgumentError, match="max_query_len must be an int"):
        triton_paged_prefill(q, k_cache, v_cache, tables, qsl, seq_lens, 0.25, max_query_len=None)
    with pytest.raises(KernelArgumentError, match=r"first_seq must be an int in \[0, num_seqs=2\], got 3"):
        triton_paged_prefill(q, k_cache, v_cache, tables, qsl, seq_lens, 0.25, max_query_len=1, first_seq=3)
    for out in (torch.empty(3, 4, 16), torch.empty(2, 4, 16).half(), torch.empty(2, 4, 32)[:, :, ::2]):
        with pytest.raises(KernelArgumentError, match="out must be like q"):
            triton_paged_prefill(q, k_cache, v_cache, tables, qsl, seq_lens, 0.25, max_query_len=1, out=out)
        with pytest.raises(KernelArgumentError, match="out must be like q"):
            triton_paged_decode(q, k_cache, v_cache, tables, seq_lens, 0.25, out=out)


def test_write_kv_argument_errors():
    _, k_cache, v_cache, _, _, _ = _args()
    k = torch.randn(3, 2, 16)
    with pytest.raises(KernelArgumentError, match=r"v must be \[num_tokens, num_kv_heads, head_dim\]=\[3, 2, 16\]"):
        triton_write_kv_cache(k, torch.randn(3, 2, 8), k_cache, v_cache, torch.tensor([0, 1, -1]))
    with pytest.raises(KernelArgumentError, match="slot_mapping must be a 1-D int32/int64"):
        triton_write_kv_cache(k, k.clone(), k_cache, v_cache, torch.tensor([0.0, 1.0, 2.0]))
