"""TritonAttentionBackend: the CUDA attention path (kernels/triton_attention.py).

Decode-only steps run the split-K decode kernel, every other step the prefill/mixed
kernel; both read the paged cache in place and never sync with the host, so decode steps
can be captured in CUDA graphs. The split count comes from `metadata.max_seq_len`, a host
bound: a graph captured with max_seq_len = max_model_len replays for any context length.
Results equal TorchAttentionBackend's up to float rounding (tests and benchmarks/gpu_check.py).
"""

from __future__ import annotations

from loraplex.core.attention import AttentionBackend


class TritonAttentionBackend(AttentionBackend):
    name = "triton"

    def __init__(self) -> None:
        # Imported here: kernel definitions must follow the TRITON_INTERPRET decision.
        from loraplex.kernels import triton_attention
        self._kernels = triton_attention

    def forward(self, q, k, v, k_cache, v_cache, metadata, *, scale, sliding_window):
        kernels = self._kernels
        kernels.triton_write_kv_cache(k, v, k_cache, v_cache, metadata.slot_mapping)
        if metadata.is_decode_only:
            return kernels.triton_paged_decode(q, k_cache, v_cache, metadata.block_tables, metadata.seq_lens,
                                               scale, max_seq_len=metadata.max_seq_len,
                                               sliding_window=sliding_window)
        return kernels.triton_paged_prefill(q, k_cache, v_cache, metadata.block_tables, metadata.query_start_loc,
                                            metadata.seq_lens, scale, max_query_len=metadata.max_query_len,
                                            sliding_window=sliding_window)
