"""The KV cache's element type: the model's dtype ("auto") or fp8, as vLLM's `kv_cache_dtype`.

An fp8 cache stores K and V as they are (scale 1, what vLLM uses when a checkpoint carries no
KV scales), rounded to nearest and clamped to the format's largest finite value, so it never
holds NaN or inf. It halves the bytes per token of a 16-bit cache: twice the tokens in the
same memory, and half the bytes a decode step's attention reads.
"""

from __future__ import annotations

import torch

FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
_FP8 = {"fp8": torch.float8_e4m3fn, "fp8_e4m3": torch.float8_e4m3fn,
        "fp8_e5m2": torch.float8_e5m2}


def resolve_kv_cache_dtype(name: str, model_dtype: torch.dtype) -> torch.dtype:
    """`name` is one of ember.config.KV_CACHE_DTYPES (CacheConfig validates it)."""
    return model_dtype if name == "auto" else _FP8[name]


def is_fp8(dtype: torch.dtype) -> bool:
    return dtype in FP8_DTYPES


def quantize_kv(x: torch.Tensor, cache_dtype: torch.dtype) -> torch.Tensor:
    """x in the cache's dtype (x itself when it already is)."""
    if x.dtype == cache_dtype:
        return x
    if is_fp8(cache_dtype):
        limit = torch.finfo(cache_dtype).max
        return x.clamp(-limit, limit).to(cache_dtype)
    return x.to(cache_dtype)


def as_copyable(t: torch.Tensor) -> torch.Tensor:
    """t's bytes as uint8 when it is fp8 (PyTorch has no index_copy_ for fp8 on the CPU)."""
    return t.view(torch.uint8) if is_fp8(t.dtype) else t
