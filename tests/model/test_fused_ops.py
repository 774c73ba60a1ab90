"""The fused elementwise ops against the PyTorch ops they replace, and a whole decoder run
through them: ember.model.cpu_ops (C, on the CPU) and ember.model.triton_ops (without a GPU in
triton's interpreter on CPU tensors: conftest.py sets TRITON_INTERPRET=1)."""

from __future__ import annotations

import os

import pytest
import torch

from ember.model import cpu_ops, layers
from ember.model.loader import load_model
from tests.factories import run_greedy, tiny_model_dir

try:
    from ember.model import triton_ops
except ImportError:
    triton_ops = None

IMPLEMENTATIONS = ["cpu", "triton"]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.fixture(params=IMPLEMENTATIONS)
def impl(request):
    """(ops module, device) for each implementation that can run here."""
    if request.param == "cpu":
        if cpu_ops.load_library() is None:
            pytest.skip("no C compiler: the CPU ops are not built")
        return cpu_ops, torch.device("cpu")
    if triton_ops is None:
        pytest.skip("triton is not installed")
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    if not torch.cuda.is_available() and not interpreted:
        pytest.skip("no GPU and TRITON_INTERPRET is not 1")
    return triton_ops, torch.device("cpu" if interpreted else "cuda")


def _supported(ops, dtype) -> None:
    if ops is cpu_ops and dtype == torch.float16:
        pytest.skip("the CPU ops serve float32 and bfloat16; float16 keeps PyTorch's ops")


def _randn(*shape, dtype, device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=gen).to(dtype).to(device)


def _torch_path(monkeypatch):
    monkeypatch.setattr(layers, "fused_ops", lambda x: None)


@pytest.mark.parametrize("dtype", DTYPES)
def test_add_and_rms_norm_match_pytorch(impl, dtype):
    ops, device = impl
    _supported(ops, dtype)
    norm = layers.RMSNorm(96, 1e-6, dtype, device)
    norm.weight.data = 1 + 0.1 * _randn(96, dtype=dtype, device=device, seed=1)
    x, residual = (_randn(5, 96, dtype=dtype, device=device, seed=s) for s in (2, 3))
    expected_sum = x + residual
    out, summed = ops.rms_norm(x.clone(), norm.weight, norm.eps, residual)
    assert torch.equal(summed, expected_sum)  # the sum rounds once, as PyTorch's add
    expected = norm.weight * torch.nn.functional.rms_norm(
        summed.float(), (96,), eps=norm.eps).to(dtype)
    tol = 1e-6 if dtype == torch.float32 else 1e-2  # the fp32 sum of squares may differ in order
    torch.testing.assert_close(out, expected, rtol=tol, atol=tol)
    alone, same = ops.rms_norm(x, norm.weight, norm.eps)
    assert same is x
    torch.testing.assert_close(alone, norm.weight * torch.nn.functional.rms_norm(
        x.float(), (96,), eps=norm.eps).to(dtype), rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rope_on_a_strided_qkv_view_is_pytorchs_bit_for_bit(impl, dtype, monkeypatch):
    ops, device = impl
    _supported(ops, dtype)
    heads, head_dim = 3, 16
    qkv = _randn(4, (heads + 1) * head_dim, dtype=dtype, device=device, seed=4)
    qk = qkv[:, : heads * head_dim].view(4, heads, head_dim)  # rows strided, as in Attention
    angles = torch.arange(4, device=device).float()[:, None] * torch.linspace(
        0.1, 1.0, head_dim // 2, device=device)
    angles = torch.cat((angles, angles), dim=-1)
    cos, sin = angles.cos().to(dtype)[:, None], angles.sin().to(dtype)[:, None]
    fused = ops.apply_rope(qk, cos, sin)
    _torch_path(monkeypatch)
    assert torch.equal(fused, layers.apply_rope(qk, cos, sin))


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_and_mul_matches_pytorch(impl, dtype, monkeypatch):
    ops, device = impl
    _supported(ops, dtype)
    gate_up = _randn(3, 2 * 40, dtype=dtype, device=device, seed=5) * 4
    if hasattr(ops, "silu_and_mul"):
        fused = ops.silu_and_mul(gate_up)
    else:  # the decoder keeps PyTorch's op under these fused ops
        monkeypatch.setattr(layers, "fused_ops", lambda x: ops)
        fused = layers.silu_and_mul(gate_up)
    _torch_path(monkeypatch)
    expected = layers.silu_and_mul(gate_up)
    tol = 1e-6 if dtype == torch.float32 else 1e-2  # exp may differ in its last fp32 bit
    torch.testing.assert_close(fused, expected, rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_a_decoder_through_the_fused_ops_matches_pytorch(impl, tmp_path, dtype, monkeypatch):
    """Greedy decoding through the fused ops: the same tokens, logits within rounding."""
    ops, device = impl
    model, info = load_model(tiny_model_dir(tmp_path, num_layers=2), dtype, device.type)
    prompts = [[5, 17, 3, 99, 42], [7, 8]]
    monkeypatch.setattr(layers, "fused_ops", lambda x: ops)
    fused = run_greedy(model, info, prompts, max_new_tokens=4)
    _torch_path(monkeypatch)
    expected = run_greedy(model, info, prompts, max_new_tokens=4)
    tol = 1e-5 if dtype == "float32" else 5e-2
    for got, want in zip(fused, expected):
        assert got.new_token_ids == want.new_token_ids
        torch.testing.assert_close(got.logits, want.logits, rtol=tol, atol=tol)


def test_which_ops_serve_which_tensors(monkeypatch):
    """CPU tensors take the C ops unless EMBER_CPU_FUSED_OPS=0; float16 keeps PyTorch's; the
    GPU ops stay off unless EMBER_FUSED_OPS=1."""
    from ember import envs

    monkeypatch.delenv("EMBER_FUSED_OPS", raising=False)
    monkeypatch.delenv("EMBER_CPU_FUSED_OPS", raising=False)
    assert envs.fused_ops() is False and envs.cpu_fused_ops() is True
    monkeypatch.setenv("EMBER_FUSED_OPS", "1")
    assert envs.fused_ops() is True
    monkeypatch.setenv("EMBER_CPU_FUSED_OPS", "0")
    assert envs.cpu_fused_ops() is False
    if cpu_ops.load_library() is not None:
        monkeypatch.setattr(layers, "_cpu_fusion_on", lambda: True)
        assert layers.fused_ops(torch.zeros(1)) is cpu_ops
        assert layers.fused_ops(torch.zeros(1, dtype=torch.float16)) is None
    monkeypatch.setattr(layers, "_cpu_fusion_on", lambda: False)
    assert layers.fused_ops(torch.zeros(1)) is None
