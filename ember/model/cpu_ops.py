"""The decoder's fused elementwise ops on the CPU, with the same calls as ember.model.triton_ops:
residual add + RMSNorm and neox RoPE in C (csrc/cpu_ops.c). There is no SiLU-and-mul: a fused C
loop measured no faster than PyTorch's (its cost is exp, not memory traffic), so layers.py keeps
PyTorch's for it.

A decode step's elementwise work in PyTorch is a dozen small ops per layer, each with its own
temporaries; these do each in one pass. float32 and bfloat16 only (`supports`).
"""

from __future__ import annotations

import ctypes
from functools import cache
from pathlib import Path

import torch

from ember.native import load_cpu_kernel

_SOURCE = Path(__file__).parent / "csrc" / "cpu_ops.c"
# -ffp-contract=off: no fused multiply-adds, so each product rounds as PyTorch's does.
_EXTRA_FLAGS = ["-ffp-contract=off"]
_KIND = {torch.float32: 0, torch.bfloat16: 1}


@cache
def load_library() -> ctypes.CDLL | None:
    """The compiled ops, or None (logged) where no C compiler is available."""
    lib = load_cpu_kernel("cpu_ops", _SOURCE, _EXTRA_FLAGS)
    if lib is not None:
        for fn in (lib.rms_norm, lib.apply_rope):
            fn.restype = None
    return lib


def supports(x: torch.Tensor) -> bool:
    return x.device.type == "cpu" and x.dtype in _KIND and load_library() is not None


def _ptr(t: torch.Tensor | None) -> ctypes.c_void_p:
    return ctypes.c_void_p(t.data_ptr() if t is not None else None)


def _threads() -> ctypes.c_int:
    return ctypes.c_int(torch.get_num_threads())


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
             residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight * rmsnorm(s), s) for s = x (+ residual): [T, dim] contiguous. The sum is
    written into x (as the PyTorch path's in-place add)."""
    if not x.is_contiguous() or (residual is not None and not residual.is_contiguous()):
        raise ValueError("rms_norm needs contiguous rows")
    out = torch.empty_like(x)
    dim = x.shape[-1]
    load_library().rms_norm(_ptr(x), _ptr(residual), _ptr(weight), _ptr(out),
                            ctypes.c_int(x.numel() // dim), ctypes.c_int(dim),
                            ctypes.c_float(eps), ctypes.c_int(_KIND[x.dtype]), _threads())
    return out, x


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """As triton_ops.apply_rope: x [T, heads, head_dim], its last dim contiguous -> a new
    contiguous tensor of the same shape."""
    if x.stride(2) != 1:
        raise ValueError("apply_rope needs the head dimension contiguous")
    num_tokens, num_heads, head_dim = x.shape
    cos, sin = cos.contiguous(), sin.contiguous()
    out = torch.empty(x.shape, dtype=x.dtype)
    load_library().apply_rope(_ptr(x), _ptr(cos), _ptr(sin), _ptr(out), ctypes.c_int(num_tokens),
                              ctypes.c_int(num_heads), ctypes.c_int(head_dim // 2),
                              ctypes.c_long(x.stride(0)), ctypes.c_long(x.stride(1)),
                              ctypes.c_int(_KIND[x.dtype]), _threads())
    return out
