"""Small C libraries compiled at first use with the system compiler and cached in ember's
cache dir (keyed by source, flags and anything else the caller names), then bound with
ctypes. A machine without a compiler gets None, and the caller its pure-Python fallback."""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path

from ember.envs import cache_dir

logger = logging.getLogger(__name__)


def cpu_signature() -> str:
    """The CPU's feature flags: part of the cache key of libraries built with -march=native."""
    try:
        return next(line for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("flags"))
    except (OSError, StopIteration):
        return platform.processor()


_HEADERS = Path(__file__).parent / "csrc"  # shared by every source: `#include "bf16.h"`


def load_c_library(name: str, source: bytes, compile_flags: list[str], link_flags: list[str],
                   extra_key: bytes = b"") -> ctypes.CDLL | None:
    """The library built from `source` (compiled, then linked: see cpu_kernel.py for why
    linking is a separate step), or None with a warning naming what failed."""
    compile_flags = [*compile_flags, f"-I{_HEADERS}"]
    headers = b"".join(p.read_bytes() for p in sorted(_HEADERS.glob("*.h")))
    key = hashlib.sha256(source + headers + " ".join(compile_flags + link_flags).encode()
                         + extra_key)
    lib_path = cache_dir() / "kernels" / f"{name}-{key.hexdigest()[:16]}.so"
    try:
        if not lib_path.exists():
            _build(lib_path, source, compile_flags, link_flags)
        return ctypes.CDLL(str(lib_path))
    except (OSError, RuntimeError, subprocess.SubprocessError) as err:
        logger.warning("native %s unavailable, using the Python fallback: %s", name, err)
        return None


def _build(out: Path, source: bytes, compile_flags: list[str], link_flags: list[str]) -> None:
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise RuntimeError("no C compiler (cc/gcc) on PATH")
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        src, obj, lib = Path(tmp) / "source.c", Path(tmp) / "source.o", Path(tmp) / out.name
        src.write_bytes(source)
        subprocess.run([compiler, *compile_flags, "-c", str(src), "-o", str(obj)],
                       check=True, capture_output=True, timeout=120)
        subprocess.run([compiler, *link_flags, str(obj), "-o", str(lib), "-lm"],
                       check=True, capture_output=True, timeout=120)
        os.replace(lib, out)  # atomic: concurrent builders never see half a library


# The flags of ember's CPU kernels. -ffast-math only when compiling: linked with it, gcc adds
# crtfastmath.o, whose loading turns on flush-to-zero for the whole process (user code too).
KERNEL_FLAGS = ("-O3", "-march=native", "-ffast-math", "-fopenmp", "-fPIC")
KERNEL_LINK_FLAGS = ("-shared", "-fopenmp")


def load_cpu_kernel(name: str, source: Path,
                    extra_flags: Sequence[str] = ()) -> ctypes.CDLL | None:
    """`source` built for this CPU (-march=native, -ffast-math, OpenMP; cached per CPU), or None
    with a warning where it cannot be built."""
    return load_c_library(name, source.read_bytes(), [*KERNEL_FLAGS, *extra_flags],
                          list(KERNEL_LINK_FLAGS), cpu_signature().encode())
