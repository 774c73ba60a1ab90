"""Builds and binds csrc/rans.c (the encoder and the CPU decoder) with the system compiler, once
per source and CPU; without a compiler `load_rans()` is None and callers use reference.py."""

from __future__ import annotations

import ctypes
import platform
from functools import cache
from pathlib import Path

from ember.native import cpu_signature, load_c_library

_SOURCE = Path(__file__).parent / "csrc" / "rans.c"
_FLAGS = ["-O3", "-march=native", "-fPIC"]
_P = ctypes.c_void_p
_I = ctypes.c_int64
_SIGNATURES = {
    "ember_exponent_histogram": (None, [_P, _I, _P]),
    "ember_rans_encode": (None, [_P, _I, _P, _I, _I, _P, _P, _P]),
    "ember_rans_pack": (None, [_P, _P, _I, _P]),
    "ember_rans_decode": (_I, [_P, _P, _P, _P, _P, _I, _I, _I, _P]),
}


@cache
def load_rans() -> ctypes.CDLL | None:
    if platform.system() != "Linux":
        return None
    lib = load_c_library("rans", _SOURCE.read_bytes(), _FLAGS, ["-shared"],
                         cpu_signature().encode())
    if lib is None:
        return None
    for name, (restype, argtypes) in _SIGNATURES.items():
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = restype, argtypes
    return lib
