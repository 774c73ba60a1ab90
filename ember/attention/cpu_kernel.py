"""Builds and binds the C paged-attention kernel (csrc/paged_attention.c) for the CPU backend.

Compiled once per source and CPU into ember's cache dir with the system C compiler (about a
second); when that fails, `load_kernel()` returns None and the backend stays on pure PyTorch.
"""

from __future__ import annotations

import ctypes
import platform
from functools import cache
from pathlib import Path

import torch

from ember.native import load_cpu_kernel

_SOURCE = Path(__file__).parent / "csrc" / "paged_attention.c"
_IO_KINDS = {torch.float32: 0, torch.bfloat16: 1}
_CACHE_KINDS = {torch.float32: 0, torch.bfloat16: 1, torch.float8_e4m3fn: 2,
                torch.float8_e5m2: 3}


@cache
def load_kernel() -> ctypes.CDLL | None:
    """The compiled kernel library, or None (logged) when it cannot be built here."""
    if platform.system() != "Linux":
        return None
    lib = load_cpu_kernel("paged_attention", _SOURCE)
    if lib is None:
        return None
    for name in ("paged_attention", "write_kv"):
        getattr(lib, name).restype = ctypes.c_int
    return lib


def kernel_supports(lib: ctypes.CDLL | None, dtype: torch.dtype, cache_dtype: torch.dtype,
                    num_heads: int, num_kv_heads: int, head_dim: int) -> bool:
    """Whether the kernel attends `dtype` queries over a `cache_dtype` cache of this shape."""
    return (lib is not None and dtype in _IO_KINDS and cache_dtype in _CACHE_KINDS
            and bool(lib.supports_kinds(_IO_KINDS[dtype], _CACHE_KINDS[cache_dtype]))
            and num_heads // num_kv_heads <= lib.max_group() and lib.supports_head_dim(head_dim))


def paged_attention(
    lib: ctypes.CDLL,
    q: torch.Tensor,  # [num_tokens, heads, dim], contiguous
    key_cache: torch.Tensor,  # [kv_heads, num_blocks, block, dim]
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,  # [num_seqs, max_blocks] int64
    query_start: torch.Tensor,  # [num_seqs + 1] int32
    context_lens: torch.Tensor,  # [num_seqs] int32
    scale: float,
    window: int | None,
) -> torch.Tensor:  # [num_tokens, heads, dim]
    q = q.contiguous()
    out = torch.empty_like(q)
    kv_heads, num_blocks, block_size, head_dim = key_cache.shape
    ptr = ctypes.c_void_p
    status = lib.paged_attention(
        ptr(q.data_ptr()), ptr(key_cache.data_ptr()), ptr(value_cache.data_ptr()),
        ptr(block_tables.data_ptr()), ptr(query_start.data_ptr()), ptr(context_lens.data_ptr()),
        ptr(out.data_ptr()), ctypes.c_int(context_lens.shape[0]), ctypes.c_int(q.shape[1]),
        ctypes.c_int(kv_heads), ctypes.c_int(head_dim), ctypes.c_int(num_blocks),
        ctypes.c_int(block_size.bit_length() - 1), ctypes.c_int(block_tables.shape[1]),
        ctypes.c_float(scale), ctypes.c_int(window or 0), ctypes.c_int(_IO_KINDS[q.dtype]),
        ctypes.c_int(_CACHE_KINDS[key_cache.dtype]), ctypes.c_int(torch.get_num_threads()))
    if status != 0:
        raise ValueError(f"CPU attention kernel cannot serve head_dim={head_dim} with "
                         f"{q.shape[1] // kv_heads} query heads per kv head, {q.dtype} queries "
                         f"and a {key_cache.dtype} cache")
    return out


def write_kv(lib: ctypes.CDLL, k: torch.Tensor, v: torch.Tensor, key_cache: torch.Tensor,
             value_cache: torch.Tensor, slot_mapping: torch.Tensor) -> bool:
    """Copy k/v [tokens, kv_heads, dim] into the caches' slots (one memcpy per row; PyTorch's
    index_copy_ on the strided views costs ~10x more at decode sizes). False, with nothing
    written, when the rows are not contiguous or the dtypes differ: the caller falls back."""
    if (k.stride(-1) != 1 or v.stride(-1) != 1 or not key_cache.is_contiguous()
            or k.dtype != key_cache.dtype or v.dtype != key_cache.dtype):
        return False
    kv_heads, num_blocks, block_size, head_dim = key_cache.shape
    ptr, i64 = ctypes.c_void_p, ctypes.c_int64
    status = lib.write_kv(
        ptr(k.data_ptr()), ptr(v.data_ptr()), ptr(key_cache.data_ptr()),
        ptr(value_cache.data_ptr()), ptr(slot_mapping.data_ptr()), ctypes.c_int(k.shape[0]),
        ctypes.c_int(kv_heads), ctypes.c_int(head_dim), i64(num_blocks * block_size),
        i64(k.stride(0)), i64(k.stride(1)), i64(v.stride(0)), i64(v.stride(1)),
        ctypes.c_int(k.element_size()))
    if status != 0:
        raise IndexError(f"a KV slot is outside the cache's {num_blocks * block_size} slots")
    return True
