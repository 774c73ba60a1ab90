"""The compiled CPU attention kernel must not change the process's floating-point state."""

from __future__ import annotations

import subprocess
import sys

import pytest


def test_loading_the_kernel_keeps_subnormals():
    # a fresh process: this one may already have loaded the kernel
    code = ("from ember.attention.cpu_kernel import load_kernel\n"
            "tiny = float.fromhex('0x0.0000000000001p-1022')\n"
            "assert tiny * 1.0 > 0\n"
            "if load_kernel() is None: raise SystemExit(3)\n"
            "assert tiny * 1.0 > 0, 'flush-to-zero was switched on'\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300)
    if proc.returncode == 3:
        pytest.skip("no C compiler here: the kernel is not built")
    assert proc.returncode == 0, proc.stderr
