"""bf16 GEMMs on an AVX2 CPU whose oneDNN has no bf16 kernels, from weights packed once into
column panels (csrc/bf16_panel_gemm.c): the broadcast-and-FMA scheme of an fp32 GEMM, with the
bf16 weights widened in registers. It serves any row count, so a packed weight needs no other
copy; the weights stay bf16 in memory.
"""

from __future__ import annotations

import ctypes
from functools import cache
from pathlib import Path

import torch

from ember.native import load_cpu_kernel

PANEL = 16  # output columns per panel
# A panel's columns in memory: the order the kernel's 128-bit-lane unpacks put back in place.
_PANEL_ORDER = (0, 1, 2, 3, 8, 9, 10, 11, 4, 5, 6, 7, 12, 13, 14, 15)
_OUT_KINDS = {torch.bfloat16: 0, torch.float32: 1}

_SOURCE = Path(__file__).parent / "csrc" / "bf16_panel_gemm.c"


@cache
def _library() -> ctypes.CDLL | None:
    lib = load_cpu_kernel("bf16_panel_gemm", _SOURCE)
    if lib is None or not lib.panel_gemm_available():
        return None
    lib.panel_gemm.restype = ctypes.c_int
    return lib


def available() -> bool:
    """Whether this CPU has the kernel (x86 with AVX2 and FMA, and a C compiler)."""
    return _library() is not None


def pack(weight: torch.Tensor) -> torch.Tensor:
    """bf16 weight [n, k] -> panels [ceil(n / 16), k, 16] (the last one zero-padded)."""
    n, k = weight.shape
    num_panels = -(-n // PANEL)
    padded = weight.new_zeros(num_panels * PANEL, k)
    padded[:n] = weight
    order = torch.tensor(_PANEL_ORDER)
    return padded.view(num_panels, PANEL, k)[:, order, :].transpose(1, 2).contiguous()


def linear(x: torch.Tensor, panels: torch.Tensor, bias: torch.Tensor | None, out_features: int,
           out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """x [..., k] bf16 times the packed weight (+ bias) -> [..., out_features] in out_dtype
    (float32: the bf16 result widened, as `.float()` of it)."""
    k = panels.shape[1]
    rows = x.numel() // k
    out = torch.empty(*x.shape[:-1], out_features, dtype=out_dtype)
    if rows == 0:
        return out
    x = x.reshape(rows, k).contiguous()
    status = _library().panel_gemm(
        ctypes.c_void_p(x.data_ptr()), ctypes.c_void_p(panels.data_ptr()),
        ctypes.c_void_p(bias.data_ptr() if bias is not None else None),
        ctypes.c_void_p(out.data_ptr()), ctypes.c_int(rows), ctypes.c_int(out_features),
        ctypes.c_int(k), ctypes.c_int(_OUT_KINDS[out_dtype]),
        ctypes.c_int(torch.get_num_threads()))
    if status != 0:
        raise MemoryError(f"panel GEMM of {rows} rows x {k} -> {out_features} failed ({status})")
    return out
