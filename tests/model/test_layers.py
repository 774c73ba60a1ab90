"""Dense layers vs transformers' Llama modules: RMSNorm, rotary embedding, gated MLP."""

from __future__ import annotations

import platform

import pytest
import torch
import transformers
from transformers.models.llama import modeling_llama as hf

from ember.model.layers import GatedMLP, RMSNorm, RotaryEmbedding, apply_rope
from ember.model.registry import resolve_rope

CONFIG = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_attention_heads=2,
              num_key_value_heads=1, mlp_bias=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_rms_norm(dtype):
    theirs = hf.LlamaRMSNorm(32, eps=1e-5).to(dtype)
    ours = RMSNorm(32, 1e-5, dtype, "cpu")
    with torch.no_grad():
        theirs.weight.normal_()
        ours.weight.copy_(theirs.weight)
    x = torch.randn(7, 32, dtype=dtype) * 3
    torch.testing.assert_close(ours(x), theirs(x))  # dtype-default tolerances (fp32: 1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rotary_matches_llama(dtype):
    config = transformers.LlamaConfig(**CONFIG, rope_parameters={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 32})
    head_dim = 16
    positions = torch.tensor([0, 1, 5, 31, 32, 1000, 7])
    q = torch.randn(1, 2, len(positions), head_dim, dtype=dtype)  # HF: [batch, heads, T, dim]
    k = torch.randn(1, 1, len(positions), head_dim, dtype=dtype)
    cos, sin = hf.LlamaRotaryEmbedding(config)(q, positions.unsqueeze(0))
    q_ref, k_ref = hf.apply_rotary_pos_emb(q, k, cos, sin)

    our_cos, our_sin = RotaryEmbedding(resolve_rope(config, head_dim), "cpu")(positions, dtype)
    qk = torch.cat([q[0].transpose(0, 1), k[0].transpose(0, 1)], dim=1)  # [T, 3, dim]
    out = apply_rope(qk, our_cos, our_sin)
    torch.testing.assert_close(out[:, :2], q_ref[0].transpose(0, 1), atol=0, rtol=0)
    torch.testing.assert_close(out[:, 2:], k_ref[0].transpose(0, 1), atol=0, rtol=0)


def test_gated_mlp_with_bias():
    config = transformers.LlamaConfig(**CONFIG)
    theirs = hf.LlamaMLP(config)
    ours = GatedMLP(32, 48, True, torch.float32, "cpu")
    with torch.no_grad():
        for p in theirs.parameters():
            p.normal_()
        ours.gate_up_proj.weight.copy_(torch.cat([theirs.gate_proj.weight, theirs.up_proj.weight]))
        ours.gate_up_proj.bias.copy_(torch.cat([theirs.gate_proj.bias, theirs.up_proj.bias]))
        ours.down_proj.weight.copy_(theirs.down_proj.weight)
        ours.down_proj.bias.copy_(theirs.down_proj.bias)
        x = torch.randn(5, 32)
        torch.testing.assert_close(ours(x), theirs(x), atol=1e-5, rtol=1e-5)


def _logits(model, info):
    """Logits of two sequences (13 and 7 new tokens) through the torch attention backend."""
    from ember.attention.backend import BatchLayout, allocate_kv_cache
    from ember.attention.context import ForwardContext, forward_context
    from ember.attention.torch_backend import TorchBackend

    backend = TorchBackend()
    caches = allocate_kv_cache(info.num_layers, 8, 4, info.num_kv_heads, info.head_dim,
                               info.dtype, torch.device("cpu"), backend)
    layout = BatchLayout([13, 7], [13, 7], [[0, 1, 2, 3], [4, 5]],
                         torch.tensor([*range(13), *range(16, 23)]), 4)
    meta = backend.build_metadata(layout, torch.device("cpu"))
    ids = torch.arange(5, 25)
    pos = torch.tensor([*range(13), *range(7)])
    with torch.inference_mode(), forward_context(ForwardContext(backend, meta, caches)):
        return model.compute_logits(model(ids, pos))


@pytest.fixture
def bf16_model_dir(tmp_path):
    from ember.model.demo import build_random_model

    return build_random_model(tmp_path / "m", "Qwen2ForCausalLM", dtype="bfloat16",
                              tie_word_embeddings=True)


def test_prepack_cpu_packs_bf16_linears(bf16_model_dir):
    """With oneDNN bf16 kernels the packed weights change speed, never numbers; without them
    (an AVX2-only CPU) every bf16 linear is packed into column panels instead, the same logits
    up to rounding."""
    from ember.model import panel_gemm
    from ember.model.layers import Linear, onednn_bf16_supported
    from ember.model.loader import load_model

    plain = _logits(*load_model(bf16_model_dir))
    model, info = load_model(bf16_model_dir)
    packed = model.prepack_cpu()
    linears = [m for m in model.modules() if isinstance(m, Linear)]
    assert packed == len(linears)
    if onednn_bf16_supported():
        assert torch.equal(_logits(model, info), plain)
    else:
        assert panel_gemm.available() and all(m.panels is not None for m in linears)
        torch.testing.assert_close(_logits(model, info), plain, rtol=0.02, atol=0.02)


@pytest.mark.skipif(platform.machine() != "x86_64", reason="the panel kernel needs AVX2")
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_panel_linears_match_plain_logits(bf16_model_dir, monkeypatch, dtype):
    """The AVX2 path, forced on any x86 CPU: the same logits as 16-bit F.linear up to rounding,
    and the lm_head's float32 logits exactly its 16-bit ones widened."""
    from ember.model import layers
    from ember.model.loader import load_model

    monkeypatch.setattr(layers, "onednn_bf16_supported", lambda: False)
    monkeypatch.setattr(layers, "onednn_fp16_supported", lambda: False)
    plain = _logits(*load_model(bf16_model_dir, dtype))
    model, info = load_model(bf16_model_dir, dtype)
    assert model.prepack_cpu() == sum(isinstance(m, layers.Linear) for m in model.modules())
    assert model.lm_head.panels is not None
    torch.testing.assert_close(_logits(model, info), plain, rtol=0.02, atol=0.02)
    hidden = torch.randn(5, info.hidden_size).to(info.dtype)
    assert torch.equal(model.compute_logits(hidden), model.lm_head(hidden).float())


def test_widened_bf16_linears_match_plain_logits(bf16_model_dir, monkeypatch):
    """Without oneDNN bf16 and without the panel kernel (no AVX2, or resident weights): the C
    loop and widened slices, the same logits as bf16 F.linear up to rounding."""
    from ember.model import layers, panel_gemm
    from ember.model.loader import load_model

    monkeypatch.setattr(layers, "onednn_bf16_supported", lambda: False)
    monkeypatch.setattr(panel_gemm, "available", lambda: False)
    plain = _logits(*load_model(bf16_model_dir))
    model, info = load_model(bf16_model_dir)
    assert model.prepack_cpu() == 0
    assert all(m.widen_half for m in model.modules() if isinstance(m, layers.Linear))
    torch.testing.assert_close(_logits(model, info), plain, rtol=0.02, atol=0.02)


@pytest.mark.parametrize("panels", [True, False])
@pytest.mark.parametrize("rows", [3, 20])
def test_fp16_linear_without_onednn_fp16(monkeypatch, rows, panels):
    """Packed into panels where the AVX2 kernel is (else, or for a weight refilled per layer,
    widened): either way within fp16 rounding of the exact product."""
    from ember.model import layers, panel_gemm

    monkeypatch.setattr(layers, "onednn_fp16_supported", lambda: False)
    if not panels:
        monkeypatch.setattr(panel_gemm, "available", lambda: False)
    elif platform.machine() != "x86_64":
        pytest.skip("the panel kernel needs AVX2")
    linear = layers.Linear(48, 24, True, torch.float16, "cpu")
    with torch.no_grad():
        linear.weight.normal_()
        linear.bias.normal_()
    ref_weight = linear.weight.detach().double()
    assert linear.prepack_cpu() is panels
    assert (linear.panels is not None) is panels and linear.widen_half is not panels
    x = torch.randn(rows, 48).half()
    ref = x.double() @ ref_weight.t() + linear.bias.double()
    torch.testing.assert_close(linear(x).double(), ref, rtol=2 ** -10, atol=1e-4)


def test_prepack_cpu_packs_fp32_linears(tmp_path):
    """fp32 weights are packed for oneDNN too: the same logits up to the order of the sums."""
    from ember.model.demo import build_random_model
    from ember.model.layers import Linear
    from ember.model.loader import load_model

    model_dir = build_random_model(tmp_path / "m", "LlamaForCausalLM", dtype="float32")
    plain = _logits(*load_model(model_dir))
    model, info = load_model(model_dir)
    linears = [m for m in model.modules() if isinstance(m, Linear)]
    assert model.prepack_cpu() == len(linears)
    assert all(m.packed_weight is not None for m in linears)
    torch.testing.assert_close(_logits(model, info), plain, rtol=1e-4, atol=1e-4)
