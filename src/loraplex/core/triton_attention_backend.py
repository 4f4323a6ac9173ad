"""TritonAttentionBackend: the CUDA attention path (kernels/triton_attention.py).

Decode-only steps run the split-K decode kernel, every other step the prefill/mixed
kernel; both read the paged cache in place and never sync with the host, so decode steps
can be captured in CUDA graphs. The decode kernel's context split count comes from
`metadata.max_seq_len`, a host bound: a graph captured with max_seq_len = max_model_len
replays for any context length.

A mixed step with at least MIN_SPLIT_DECODES leading decodes (running sequences come
first) gives them to the decode kernel and only the rest to the prefill kernel, which would
run each decode as a one-row query tile per query head (reading each KV head's cache once
per query head of its group, 63 of 64 rows empty); with fewer, the extra launch (and the
decode's split reduction) would cost about what it saves. Mixed steps run their attention
outside any graph (mixed_step_graphs.py captures the pieces between), so the split is
decided per step on the host.
Results equal TorchAttentionBackend's up to float rounding (tests and benchmarks/gpu_check.py).
"""

from __future__ import annotations

import torch

from loraplex.core.attention import AttentionBackend


MIN_SPLIT_DECODES = 16


class TritonAttentionBackend(AttentionBackend):
    name = "triton"

    def __init__(self) -> None:
        # Imported here: kernel definitions must follow the TRITON_INTERPRET decision.
        from loraplex.kernels import triton_attention
        self._kernels = triton_attention

    def forward(self, q, k, v, k_cache, v_cache, metadata, *, scale, sliding_window, out=None):
        kernels = self._kernels
        kernels.triton_write_kv_cache(k, v, k_cache, v_cache, metadata.slot_mapping)
        if metadata.is_decode_only:
            return kernels.triton_paged_decode(q, k_cache, v_cache, metadata.block_tables, metadata.seq_lens,
                                               scale, max_seq_len=metadata.max_seq_len,
                                               sliding_window=sliding_window, out=out)
        decodes = metadata.num_leading_decodes if metadata.num_leading_decodes >= MIN_SPLIT_DECODES else 0
        if decodes:
            # The decodes' queries are the batch's first `decodes` tokens, one each.
            out = torch.empty_like(q) if out is None else out
            kernels.triton_paged_decode(q[:decodes], k_cache, v_cache, metadata.block_tables[:decodes],
                                        metadata.seq_lens[:decodes], scale, max_seq_len=metadata.max_seq_len,
                                        sliding_window=sliding_window, out=out[:decodes])
        return kernels.triton_paged_prefill(q, k_cache, v_cache, metadata.block_tables, metadata.query_start_loc,
                                            metadata.seq_lens, scale, max_query_len=metadata.max_query_len,
                                            sliding_window=sliding_window, first_seq=decodes, out=out)
