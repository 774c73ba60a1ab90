"""Builds and binds the C paged-attention kernel (csrc/paged_attention.c) for the CPU backend.

Compiled once per source and CPU into ember's cache dir with the system C compiler (about a
second); when that fails, `load_kernel()` returns None and the backend stays on pure PyTorch.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from functools import cache
from pathlib import Path

import torch

from ember.envs import cache_dir

logger = logging.getLogger(__name__)

_SOURCE = Path(__file__).parent / "csrc" / "paged_attention.c"
_FLAGS = ["-O3", "-march=native", "-ffast-math", "-fopenmp", "-fPIC"]
# NOTE: linked in a second step without -ffast-math: with it, gcc links crtfastmath.o into the
# library, whose loading turns on flush-to-zero for the whole process (user code included).
_LINK_FLAGS = ["-shared", "-fopenmp"]
_FUNCTIONS = {torch.float32: "paged_attention_f32", torch.bfloat16: "paged_attention_bf16"}


def _cpu_signature() -> str:
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines()
                     if line.startswith("flags"))
    except (OSError, StopIteration):
        flags = platform.processor()
    return flags


def _build(out: Path) -> None:
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise RuntimeError("no C compiler (cc/gcc) on PATH")
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        tmp_obj, tmp_lib = Path(tmp) / "kernel.o", Path(tmp) / out.name
        subprocess.run([compiler, *_FLAGS, "-c", str(_SOURCE), "-o", str(tmp_obj)],
                       check=True, capture_output=True, timeout=120)
        subprocess.run([compiler, *_LINK_FLAGS, str(tmp_obj), "-o", str(tmp_lib), "-lm"],
                       check=True, capture_output=True, timeout=120)
        os.replace(tmp_lib, out)  # atomic: concurrent builders never see half a library


@cache
def load_kernel() -> ctypes.CDLL | None:
    """The compiled kernel library, or None (logged) when it cannot be built here."""
    if platform.system() != "Linux":
        return None
    source = _SOURCE.read_bytes()
    flags = " ".join(_FLAGS + _LINK_FLAGS).encode()
    key = hashlib.sha256(source + flags + _cpu_signature().encode())
    lib_path = cache_dir() / "kernels" / f"paged_attention-{key.hexdigest()[:16]}.so"
    try:
        if not lib_path.exists():
            _build(lib_path)
        lib = ctypes.CDLL(str(lib_path))
    except (OSError, RuntimeError, subprocess.SubprocessError) as err:
        logger.warning("CPU attention kernel unavailable, using PyTorch ops: %s", err)
        return None
    for name in _FUNCTIONS.values():
        getattr(lib, name).restype = ctypes.c_int
    return lib


def kernel_supports(lib: ctypes.CDLL | None, dtype: torch.dtype, num_heads: int,
                    num_kv_heads: int, head_dim: int) -> bool:
    return (lib is not None and dtype in _FUNCTIONS
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
    status = getattr(lib, _FUNCTIONS[q.dtype])(
        ptr(q.data_ptr()), ptr(key_cache.data_ptr()), ptr(value_cache.data_ptr()),
        ptr(block_tables.data_ptr()), ptr(query_start.data_ptr()), ptr(context_lens.data_ptr()),
        ptr(out.data_ptr()), ctypes.c_int(context_lens.shape[0]), ctypes.c_int(q.shape[1]),
        ctypes.c_int(kv_heads), ctypes.c_int(head_dim), ctypes.c_int(num_blocks),
        ctypes.c_int(block_size.bit_length() - 1), ctypes.c_int(block_tables.shape[1]),
        ctypes.c_float(scale), ctypes.c_int(window or 0), ctypes.c_int(torch.get_num_threads()))
    if status != 0:
        raise ValueError(f"CPU attention kernel cannot serve head_dim={head_dim} with "
                         f"{q.shape[1] // kv_heads} query heads per kv head")
    return out
