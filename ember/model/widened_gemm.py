"""bf16 GEMMs on a CPU whose oneDNN has no bf16 kernels (AVX2 without AVX-512).

There PyTorch's bf16 `F.linear` runs about one matrix-vector product per row: 4-6x slower
than fp32 from 8 rows up. Widening the weight to fp32 a slice at a time, small enough to stay
in cache, gets fp32 GEMM speed while the weights stay bf16 in memory. The products are those
of the bf16 values, summed in fp32 and rounded once, as a bf16 GEMM does.
"""

from __future__ import annotations

import torch

# Below this many rows the bf16 GEMV reading each weight once is cheaper than widening them.
MIN_ROWS = 12
SLICE_BYTES = 2 << 20  # fp32 bytes of weight widened at a time


def widened_linear(x: torch.Tensor, weight: torch.Tensor,
                   bias: torch.Tensor | None) -> torch.Tensor:
    """F.linear(x, weight, bias) for bf16 x [T, in] and weight [out, in], computed in fp32."""
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
