"""The fused norm / rotary / SiLU-and-mul kernels against the model's torch modules, through
Triton's interpreter (float32 and float16), and a tiny model whose fused forward equals its
torch forward."""

import pytest
import torch

from loraplex.core.layers import RMSNorm, silu_and_mul
from loraplex.core.rotary import RotaryEmbedding
from loraplex.errors import KernelArgumentError
from loraplex.kernels.triton_elementwise import triton_rms_norm, triton_rotary_, triton_silu_and_mul

TOL = {torch.float32: 1e-5, torch.float16: 2e-3}


def _rel_err(out, ref):
    return float((out.double() - ref.double()).norm() / ref.double().norm())


def _norm(hidden, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    norm = RMSNorm(hidden, 1e-5, dtype=dtype, device=torch.device("cpu"))
    norm.weight.data = (1 + 0.3 * torch.randn(hidden, generator=gen)).to(dtype)
    return norm, gen


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("hidden", [64, 96])   # 96: a masked tail in the power-of-two block
def test_rms_norm_matches_torch(dtype, hidden):
    norm, gen = _norm(hidden, dtype)
    x = (3 * torch.randn(5, hidden, generator=gen)).to(dtype)
    out = triton_rms_norm(x, norm.weight, norm.eps)
    assert _rel_err(out, norm(x)) < TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_rms_norm_with_residual_adds_in_place_then_normalises(dtype):
    norm, gen = _norm(64, dtype, seed=1)
    x = torch.randn(7, 64, generator=gen).to(dtype)
    residual = torch.randn(7, 64, generator=gen).to(dtype)
    ref_out, ref_residual = norm(x, residual.clone())
    out = triton_rms_norm(x, norm.weight, norm.eps, residual)
    assert torch.equal(residual, ref_residual)          # the add rounds exactly like torch's
    assert _rel_err(out, ref_out) < TOL[dtype]


def test_rms_norm_strided_rows_and_empty_batch():
    norm, gen = _norm(32, torch.float32, seed=2)
    wide = torch.randn(4, 48, generator=gen)
    x = wide[:, :32]                                     # row stride 48
    assert _rel_err(triton_rms_norm(x, norm.weight, norm.eps), norm(x)) < 1e-5
    assert triton_rms_norm(torch.empty(0, 32), norm.weight, norm.eps).shape == (0, 32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("scaling", [None, {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                            "high_freq_factor": 4.0, "original_max_position_embeddings": 32}])
def test_rotary_in_place_on_fused_qkv_views_matches_torch(dtype, scaling):
    head_dim, q_heads, kv_heads, num_tokens = 16, 6, 2, 9
    rotary = RotaryEmbedding(head_dim, 128, 10000.0, scaling, dtype=dtype, device=torch.device("cpu"))
    gen = torch.Generator().manual_seed(3)
    qkv = torch.randn(num_tokens, (q_heads + 2 * kv_heads) * head_dim, generator=gen).to(dtype)
    positions = torch.randint(0, 128, (num_tokens,), generator=gen)
    q, k, v = qkv.split([q_heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
    q, k = q.view(num_tokens, q_heads, head_dim), k.view(num_tokens, kv_heads, head_dim)
    ref_q, ref_k = rotary(positions, q.clone(), k.clone())
    v_before = v.clone()
    triton_rotary_(positions, q, k, rotary.cos_sin_cache)
    assert _rel_err(q, ref_q) < TOL[dtype] and _rel_err(k, ref_k) < TOL[dtype]
    assert torch.equal(v, v_before)                      # v, between k and the next row, untouched


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("width", [40, 1500])            # 1500: two column blocks, a masked tail
def test_silu_and_mul_matches_torch(dtype, width):
    gen = torch.Generator().manual_seed(4)
    gate_up = (2 * torch.randn(3, 2 * width, generator=gen)).to(dtype)
    assert _rel_err(triton_silu_and_mul(gate_up), silu_and_mul(gate_up)) < TOL[dtype]


def test_launchers_refuse_bad_arguments():
    norm, _ = _norm(32, torch.float32)
    with pytest.raises(KernelArgumentError, match="weight has 32 elements for hidden size 16"):
        triton_rms_norm(torch.randn(2, 16), norm.weight, 1e-5)
    with pytest.raises(KernelArgumentError, match="residual must match x"):
        triton_rms_norm(torch.randn(2, 32), norm.weight, 1e-5, torch.randn(3, 32))
    with pytest.raises(KernelArgumentError, match="even width"):
        triton_silu_and_mul(torch.randn(2, 7))
    with pytest.raises(KernelArgumentError, match="contiguous last dimension"):
        triton_silu_and_mul(torch.randn(8, 2).t())
    cache = torch.randn(16, 8)
    with pytest.raises(KernelArgumentError, match="positions must be"):
        triton_rotary_(torch.zeros(3), torch.randn(3, 2, 8), torch.randn(3, 1, 8), cache)
    with pytest.raises(KernelArgumentError, match="power of two"):
        triton_rotary_(torch.zeros(3, dtype=torch.long), torch.randn(3, 2, 12), torch.randn(3, 1, 12),
                       torch.randn(16, 12))


def test_fused_model_forward_equals_torch_forward(tiny_checkpoint):
    """The residual-stream rewrite and the three kernels, end to end on a tiny Llama."""
    from loraplex.core.attention import TorchAttentionBackend
    from loraplex.core.loader import load_weights
    from loraplex.core.model import LlamaForCausalLM
    from loraplex.core.model_config import ModelConfig
    from loraplex.core.step_inputs import profile_step_inputs

    path = tiny_checkpoint("llama")
    cfg = ModelConfig.from_dir(path)
    outputs = []
    for fused in (False, True):
        model = LlamaForCausalLM(cfg, max_positions=64, backend=TorchAttentionBackend(), dtype=torch.float32,
                                 device=torch.device("cpu"), fused=fused)
        load_weights(model, path)
        inputs, num_blocks = profile_step_inputs(12, 64, 16, torch.device("cpu"))
        input_ids = torch.randint(1, cfg.vocab_size, (12,), generator=torch.Generator().manual_seed(5))
        caches = [(torch.zeros(num_blocks, 16, cfg.num_kv_heads, cfg.head_dim),
                   torch.zeros(num_blocks, 16, cfg.num_kv_heads, cfg.head_dim)) for _ in range(cfg.num_layers)]
        with torch.inference_mode():
            outputs.append(model(input_ids, inputs.positions, caches, inputs.metadata))
    assert outputs[0].abs().mean() > 0.1
    assert _rel_err(outputs[1], outputs[0]) < 1e-5
