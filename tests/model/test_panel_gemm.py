"""The AVX2 panel GEMM (ember/model/panel_gemm.py) against the exact product of the 16-bit
values."""

from __future__ import annotations

import platform

import pytest
import torch

from ember.model import panel_gemm

pytestmark = pytest.mark.skipif(platform.machine() != "x86_64",
                                reason="the panel kernel is written for AVX2")


DTYPES = [torch.bfloat16, torch.float16]
HALF_ULP = {torch.bfloat16: 2 ** -8, torch.float16: 2 ** -11}


def _operands(rows: int, out_features: int, in_features: int, bias: bool,
              dtype: torch.dtype = torch.bfloat16):
    gen = torch.Generator().manual_seed(rows * 7919 + in_features)
    x = torch.randn(rows, in_features, generator=gen).to(dtype)
    weight = torch.randn(out_features, in_features, generator=gen).to(dtype)
    b = torch.randn(out_features, generator=gen).to(dtype) if bias else None
    ref = x.double() @ weight.double().t() + (b.double() if bias else 0)
    return x, weight, b, ref


def test_available_on_this_x86_machine():
    assert panel_gemm.available()  # CI's CPUs have AVX2 and a C compiler


def test_pack_layout():
    """Panel p, row c holds column 16 p + j of W at slot j, in the unpacks' lane order for bf16
    and in column order for fp16."""
    weight = torch.arange(20 * 3, dtype=torch.float32).view(20, 3).bfloat16()
    panels = panel_gemm.pack(weight)
    assert panels.shape == (2, 3, 16)
    order = [0, 1, 2, 3, 8, 9, 10, 11, 4, 5, 6, 7, 12, 13, 14, 15]
    assert torch.equal(panels[0, 2], weight[order, 2])
    assert torch.equal(panels[1, 1, [0, 1, 2, 3]], weight[16:20, 1])
    assert not panels[1, :, 4:].any()  # columns past n are zero padding
    assert torch.equal(panel_gemm.pack(weight.half())[0, 2], weight[:16, 2].half())


# rows: every block shape (1 x 4 panels, 2 x 3, 3 x 2, then blocks of 6 with 1-5 left over),
# and 64 / 130 rows span several row chunks at k = 1000 (60 rows each) and 5000 (24);
# 70 columns: 4 full panels and a short one (a short group too); 5000 > the kernel's 4096 per
# pass, so its sums go through two passes.
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 6, 7, 11, 64, 130])
@pytest.mark.parametrize("in_features", [8, 36, 1000, 5000])
def test_matches_exact_product(rows, in_features, bias, dtype):
    x, weight, b, ref = _operands(rows, 70, in_features, bias, dtype)
    out = panel_gemm.linear(x, panel_gemm.pack(weight), b, 70)
    assert out.dtype == dtype and out.shape == (rows, 70)
    # within the dtype's half ulp of the exact value, plus the fp32 sum's own error
    torch.testing.assert_close(out.double(), ref, rtol=HALF_ULP[dtype],
                               atol=1e-5 * in_features ** 0.5)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [1, 3, 9])
def test_float32_output_is_the_16_bit_result_widened(rows, dtype):
    x, weight, b, _ = _operands(rows, 40, 24, True, dtype)
    panels = panel_gemm.pack(weight)
    out32 = panel_gemm.linear(x, panels, b, 40, out_float32=True)
    assert out32.dtype == torch.float32
    assert torch.equal(out32, panel_gemm.linear(x, panels, b, 40).float())


def test_dtypes_must_match_the_packed_weight():
    x, weight, _, _ = _operands(2, 20, 16, False)
    with pytest.raises(ValueError, match="bfloat16"):
        panel_gemm.linear(x.half(), panel_gemm.pack(weight), None, 20)
    with pytest.raises(ValueError, match="bf16 or fp16"):
        panel_gemm.pack(weight.float())


def test_leading_shape_and_empty_input():
    x, weight, _, ref = _operands(6, 33, 16, False)
    panels = panel_gemm.pack(weight)
    out = panel_gemm.linear(x.view(2, 3, 16), panels, None, 33)
    assert out.shape == (2, 3, 33)
    torch.testing.assert_close(out.view(6, 33).double(), ref, rtol=2 ** -8, atol=1e-4)
    assert panel_gemm.linear(x[:0], panels, None, 33).shape == (0, 33)


@pytest.mark.parametrize("dtype", DTYPES)
def test_non_finite_values_propagate(dtype):
    x, weight, _, _ = _operands(2, 20, 16, False, dtype)
    x[0, 3] = float("inf")
    x[1, 5] = float("nan")
    out = panel_gemm.linear(x, panel_gemm.pack(weight), None, 20)
    assert torch.isnan(out[1]).all()
    assert (~torch.isfinite(out[0])).all()
