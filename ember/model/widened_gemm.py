"""bf16 (and fp16) GEMMs on a CPU whose oneDNN has no kernels for them (AVX2 without AVX-512).

There PyTorch's bf16 `F.linear` computes about one matrix-vector product per row, reading
every weight once per row: 4-6x slower than fp32 from 8 rows up. Instead:
- up to GEMV_MAX_ROWS rows (bf16): a C loop (csrc/bf16_gemv.c) reads each weight from memory
  once, widens it in registers and multiplies it into every row;
- more rows, or fp16: the weight is widened to fp32 a slice at a time, small enough to stay
  in cache, and multiplied at fp32 GEMM speed.
Either way the weights stay bf16 in memory, and the products of the bf16 values are summed in
fp32 and rounded to bf16 once, as a bf16 GEMM does.
"""

from __future__ import annotations

import ctypes
from functools import cache
from pathlib import Path

import torch
import torch.nn.functional as F

from ember.native import load_cpu_kernel

GEMV_MAX_ROWS = 80  # the C loop beats widened slices up to ~64-96 rows (2-core Zen 3)
WIDEN_MIN_ROWS = 16  # without the C loop (fp16, no compiler): widening beats F.linear from here
SLICE_BYTES = 2 << 20  # fp32 bytes of weight widened at a time
_GEMV_LANES = 8  # the C loop needs in_features a multiple of this

_SOURCE = Path(__file__).parent / "csrc" / "bf16_gemv.c"


@cache
def _gemv_library() -> ctypes.CDLL | None:
    lib = load_cpu_kernel("bf16_gemv", _SOURCE)
    if lib is not None:
        lib.bf16_gemv.restype = ctypes.c_int
    return lib


def half_linear(x: torch.Tensor, weight: torch.Tensor,
                bias: torch.Tensor | None) -> torch.Tensor:
    """F.linear(x, weight, bias) for bf16 or fp16 x [..., in] and weight [out, in] on the CPU
    (fp16 has no C loop: few rows go to F.linear)."""
    rows, out_shape = x.numel() // x.shape[-1], (*x.shape[:-1], weight.shape[0])
    if (0 < rows < GEMV_MAX_ROWS and x.dtype == torch.bfloat16
            and x.shape[-1] % _GEMV_LANES == 0 and _gemv_library() is not None):
        return gemv_linear(x.reshape(rows, x.shape[-1]), weight, bias).view(out_shape)
    if rows >= WIDEN_MIN_ROWS:
        return widened_linear(x.reshape(rows, x.shape[-1]), weight, bias).view(out_shape)
    return F.linear(x, weight, bias)


def gemv_linear(x: torch.Tensor, weight: torch.Tensor,
                bias: torch.Tensor | None) -> torch.Tensor:
    """The C loop: x [T, in] bf16, in a multiple of 8."""
    x32 = x.float().contiguous()
    weight = weight.contiguous()
    bias = bias.contiguous() if bias is not None else None
    out = torch.empty(x.shape[0], weight.shape[0], dtype=x.dtype)
    status = _gemv_library().bf16_gemv(
        ctypes.c_void_p(x32.data_ptr()), ctypes.c_void_p(weight.data_ptr()),
        ctypes.c_void_p(bias.data_ptr() if bias is not None else None),
        ctypes.c_void_p(out.data_ptr()), ctypes.c_int(x.shape[0]), ctypes.c_int(weight.shape[0]),
        ctypes.c_int(weight.shape[1]), ctypes.c_int(torch.get_num_threads()))
    if status != 0:
        return F.linear(x, weight, bias)
    return out


def widened_linear(x: torch.Tensor, weight: torch.Tensor,
                   bias: torch.Tensor | None) -> torch.Tensor:
    """Widened slices: x [T, in] bf16 or fp16."""
    out_features, in_features = weight.shape
    rows = max(16, SLICE_BYTES // (4 * in_features))
    x32 = x.float()
    out = torch.empty(x.shape[0], out_features, dtype=x.dtype, device=x.device)
    for start in range(0, out_features, rows):
        w32 = weight[start:start + rows].float()
        if bias is None:
            out[:, start:start + rows] = torch.mm(x32, w32.t())
        else:
            out[:, start:start + rows] = torch.addmm(bias[start:start + rows].float(), x32,
                                                     w32.t())
    return out
