"""The fused Triton ops (ember.model.triton_ops) against the PyTorch ops they replace, and a
whole decoder run through them. Without a GPU they run in triton's interpreter on CPU tensors
(conftest.py sets TRITON_INTERPRET=1)."""

from __future__ import annotations

import pytest
import torch

from ember.model import layers
from ember.model.loader import load_model
from tests.factories import run_greedy, tiny_model_dir
from tests.triton_device import triton_device

pytest.importorskip("triton")
from ember.model import triton_ops  # noqa: E402  (after the triton check)

DEVICE = triton_device(not torch.cuda.is_available())
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _randn(*shape, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=gen).to(dtype).to(DEVICE)


def _torch_path(monkeypatch):
    monkeypatch.setattr(layers, "fused_ops", lambda x: None)


@pytest.mark.parametrize("dtype", DTYPES)
def test_add_and_rms_norm_match_pytorch(dtype):
    norm = layers.RMSNorm(96, 1e-6, dtype, DEVICE)
    norm.weight.data = 1 + 0.1 * _randn(96, dtype=dtype, seed=1)
    x, residual = _randn(5, 96, dtype=dtype, seed=2), _randn(5, 96, dtype=dtype, seed=3)
    out, summed = triton_ops.rms_norm(x, norm.weight, norm.eps, residual)
    assert torch.equal(summed, x + residual)  # the sum rounds once, as PyTorch's add
    expected = norm.weight * torch.nn.functional.rms_norm(
        summed.float(), (96,), eps=norm.eps).to(dtype)
    tol = 1e-6 if dtype == torch.float32 else 1e-2  # the fp32 sum of squares may differ in order
    torch.testing.assert_close(out, expected, rtol=tol, atol=tol)
    alone, same = triton_ops.rms_norm(x, norm.weight, norm.eps)
    assert same is x
    torch.testing.assert_close(alone, norm.weight * torch.nn.functional.rms_norm(
        x.float(), (96,), eps=norm.eps).to(dtype), rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rope_on_a_strided_qkv_view_is_pytorchs_bit_for_bit(dtype, monkeypatch):
    heads, head_dim = 3, 16
    qkv = _randn(4, (heads + 1) * head_dim, dtype=dtype, seed=4)
    qk = qkv[:, : heads * head_dim].view(4, heads, head_dim)  # rows strided, as in Attention
    angles = torch.arange(4, device=DEVICE).float()[:, None] * torch.linspace(
        0.1, 1.0, head_dim // 2, device=DEVICE)
    angles = torch.cat((angles, angles), dim=-1)
    cos, sin = angles.cos().to(dtype)[:, None], angles.sin().to(dtype)[:, None]
    fused = triton_ops.apply_rope(qk, cos, sin)
    _torch_path(monkeypatch)
    assert torch.equal(fused, layers.apply_rope(qk, cos, sin))


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_and_mul_matches_pytorch(dtype, monkeypatch):
    gate_up = _randn(3, 2 * 40, dtype=dtype, seed=5) * 4
    fused = triton_ops.silu_and_mul(gate_up)
    _torch_path(monkeypatch)
    expected = layers.silu_and_mul(gate_up)
    tol = 1e-6 if dtype == torch.float32 else 1e-2  # exp may differ in its last fp32 bit
    torch.testing.assert_close(fused, expected, rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_a_decoder_through_the_fused_ops_matches_pytorch(tmp_path, dtype, monkeypatch):
    """Greedy decoding through the fused ops: the same tokens, logits within rounding."""
    model, info = load_model(tiny_model_dir(tmp_path, num_layers=2), dtype, "cpu")
    prompts = [[5, 17, 3, 99, 42], [7, 8]]
    monkeypatch.setattr(layers, "FUSED_ON_CPU", True)
    fused = run_greedy(model, info, prompts, max_new_tokens=4)
    monkeypatch.setattr(layers, "FUSED_ON_CPU", False)
    expected = run_greedy(model, info, prompts, max_new_tokens=4)
    tol = 1e-5 if dtype == "float32" else 5e-2
    for got, want in zip(fused, expected):
        assert got.new_token_ids == want.new_token_ids
        torch.testing.assert_close(got.logits, want.logits, rtol=tol, atol=tol)


def test_gpu_fusion_is_off_unless_asked(monkeypatch):
    from ember import envs

    monkeypatch.delenv("EMBER_FUSED_OPS", raising=False)
    assert envs.fused_ops() is False
    monkeypatch.setenv("EMBER_FUSED_OPS", "1")
    assert envs.fused_ops() is True
    assert layers.fused_ops(torch.zeros(1)) is None  # CPU tensors keep the PyTorch ops
