"""16-bit GEMMs without oneDNN (ember/model/widened_gemm.py): the C loop for few rows and widened
slices for more, each against the exact product of the 16-bit values."""

from __future__ import annotations

import pytest
import torch

from ember.model import widened_gemm


def _operands(rows: int, in_features: int, bias: bool, dtype: torch.dtype = torch.bfloat16):
    gen = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, in_features, generator=gen).to(dtype)
    weight = torch.randn(70, in_features, generator=gen).to(dtype)
    b = torch.randn(70, generator=gen).to(dtype) if bias else None
    ref = x.double() @ weight.double().t() + (b.double() if bias else 0)
    return x, weight, b, ref


def _assert_rounded_once(out: torch.Tensor, ref: torch.Tensor,
                         dtype: torch.dtype = torch.bfloat16) -> None:
    """Within the dtype's half-ulp of the exact value (plus the fp32 sum's own error)."""
    assert out.dtype == dtype and out.shape == ref.shape
    half_ulp = 2 ** -8 if dtype == torch.bfloat16 else 2 ** -11
    torch.testing.assert_close(out.double(), ref, rtol=half_ulp, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("rows", [16, 40])
def test_widened_slices(monkeypatch, bias, rows, dtype):
    monkeypatch.setattr(widened_gemm, "SLICE_BYTES", 16 * 4 * 48)  # 16-row slices: 5 of them
    x, weight, b, ref = _operands(rows, 48, bias, dtype)
    _assert_rounded_once(widened_gemm.widened_linear(x, weight, b), ref, dtype)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 7, 15, 79])  # tiles of 4 x rows, then 2s and 1s
@pytest.mark.parametrize("in_features", [8, 48, 1000])
def test_gemv_loop(bias, rows, in_features):
    """70 output features: tiles of 3 weight rows and a short last tile."""
    assert widened_gemm._gemv_library() is not None  # the test machine has a C compiler
    x, weight, b, ref = _operands(rows, in_features, bias)
    _assert_rounded_once(widened_gemm.gemv_linear(x, weight, b), ref)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows", [0, 1, 15, 16, 33, 80])
def test_half_linear_takes_any_leading_shape(rows, dtype):
    x, weight, b, ref = _operands(rows, 36, True, dtype)  # 36: not a multiple of 8: F.linear
    out = widened_gemm.half_linear(x.view(1, rows, 36), weight, b)
    _assert_rounded_once(out[0], ref, dtype)
    x, weight, b, ref = _operands(rows, 48, False, dtype)
    out = widened_gemm.half_linear(x.view(rows, 1, 48), weight, b)
    _assert_rounded_once(out[:, 0], ref, dtype)


@pytest.mark.parametrize(("dtype", "in_features", "rows", "path"), [
    (torch.bfloat16, 48, 1, "gemv"), (torch.bfloat16, 48, 79, "gemv"),
    (torch.bfloat16, 48, 80, "widened"), (torch.bfloat16, 36, 15, "plain"),
    (torch.bfloat16, 36, 16, "widened"), (torch.float16, 48, 15, "plain"),
    (torch.float16, 48, 16, "widened")])
def test_half_linear_picks_the_path_by_rows_and_dtype(monkeypatch, dtype, in_features, rows,
                                                      path):
    """The C loop takes bf16 up to GEMV_MAX_ROWS rows when in_features is a multiple of 8;
    fp16 and other widths take widened slices from WIDEN_MIN_ROWS rows, F.linear below."""
    taken = []
    for name in ("gemv_linear", "widened_linear"):
        real = getattr(widened_gemm, name)
        monkeypatch.setattr(widened_gemm, name,
                            lambda *a, _real=real, _name=name: taken.append(_name) or _real(*a))
    x, weight, b, ref = _operands(rows, in_features, True, dtype)
    _assert_rounded_once(widened_gemm.half_linear(x, weight, b), ref, dtype)
    assert taken == {"gemv": ["gemv_linear"], "widened": ["widened_linear"], "plain": []}[path]
