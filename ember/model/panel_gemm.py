"""bf16 and fp16 GEMMs on an AVX2 CPU whose oneDNN has no kernels for them, from weights packed
once into column panels (csrc/panel_gemm.c): the broadcast-and-FMA scheme of an fp32 GEMM, with
the 16-bit weights widened in registers. It serves any row count, so a packed weight needs no
other copy; the weights stay 16-bit in memory.
"""

from __future__ import annotations

import ctypes
from functools import cache
from pathlib import Path

import torch

from ember.native import load_cpu_kernel

PANEL = 16  # output columns per panel
# A bf16 panel's columns in memory: the order the kernel's 128-bit-lane unpacks put back in
# place (fp16 panels are in column order: F16C widens 8 consecutive values).
_BF16_PANEL_ORDER = (0, 1, 2, 3, 8, 9, 10, 11, 4, 5, 6, 7, 12, 13, 14, 15)
DTYPES = (torch.bfloat16, torch.float16)

_SOURCE = Path(__file__).parent / "csrc" / "panel_gemm.c"


@cache
def _library() -> ctypes.CDLL | None:
    lib = load_cpu_kernel("panel_gemm", _SOURCE)
    if lib is None or not lib.panel_gemm_available():
        return None
    lib.panel_gemm.restype = ctypes.c_int
    return lib


def available() -> bool:
    """Whether this CPU has the kernel (x86 with AVX2, FMA and F16C, and a C compiler)."""
    return _library() is not None


def pack(weight: torch.Tensor) -> torch.Tensor:
    """bf16 or fp16 weight [n, k] -> panels [ceil(n / 16), k, 16] (the last one zero-padded)."""
    if weight.dtype not in DTYPES:
        raise ValueError(f"panel GEMM weights are bf16 or fp16, not {weight.dtype}")
    n, k = weight.shape
    num_panels = -(-n // PANEL)
    padded = weight.new_zeros(num_panels * PANEL, k)
    padded[:n] = weight
    order = torch.tensor(_BF16_PANEL_ORDER if weight.dtype == torch.bfloat16
                         else range(PANEL))
    return padded.view(num_panels, PANEL, k)[:, order, :].transpose(1, 2).contiguous()


def linear(x: torch.Tensor, panels: torch.Tensor, bias: torch.Tensor | None, out_features: int,
           out_float32: bool = False) -> torch.Tensor:
    """x [..., k] times the packed weight (+ bias) -> [..., out_features], x and bias in the
    panels' dtype; out in that dtype too, or its result widened to float32 (`.float()` of it)."""
    k = panels.shape[1]
    rows = x.numel() // k
    if x.dtype != panels.dtype or (bias is not None and bias.dtype != panels.dtype):
        raise ValueError(f"x and bias must be {panels.dtype} like the packed weight")
    out = torch.empty(*x.shape[:-1], out_features,
                      dtype=torch.float32 if out_float32 else panels.dtype)
    if rows == 0:
        return out
    x = x.reshape(rows, k).contiguous()
    status = _library().panel_gemm(
        ctypes.c_void_p(x.data_ptr()), ctypes.c_void_p(panels.data_ptr()),
        ctypes.c_void_p(bias.data_ptr() if bias is not None else None),
        ctypes.c_void_p(out.data_ptr()), ctypes.c_int(rows), ctypes.c_int(out_features),
        ctypes.c_int(k), ctypes.c_int(panels.dtype == torch.float16), ctypes.c_int(out_float32),
        ctypes.c_int(torch.get_num_threads()))
    if status != 0:
        raise MemoryError(f"panel GEMM of {rows} rows x {k} -> {out_features} failed ({status})")
    return out
