"""bf16 GEMMs widened to fp32 a slice at a time (ember/model/widened_gemm.py)."""

from __future__ import annotations

import pytest
import torch

from ember.model import widened_gemm


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("rows", [12, 40])
def test_widened_linear_is_the_fp32_gemm_of_the_bf16_values(monkeypatch, bias, rows):
    monkeypatch.setattr(widened_gemm, "SLICE_BYTES", 16 * 4 * 48)  # 16-row slices: 5 of them
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(rows, 48, generator=gen).bfloat16()
    weight = torch.randn(70, 48, generator=gen).bfloat16()
    b = torch.randn(70, generator=gen).bfloat16() if bias else None
    out = widened_gemm.widened_linear(x, weight, b)
    ref = x.double() @ weight.double().t() + (b.double() if bias else 0)
    assert out.dtype == torch.bfloat16 and out.shape == (rows, 70)
    # one rounding of the fp32 sum to bf16: within bf16's half-ulp of the exact value (+ fp32)
    torch.testing.assert_close(out.double(), ref, rtol=2 ** -8, atol=1e-5)
