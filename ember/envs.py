"""The one module that reads EMBER_* environment variables; every other module asks it.

Each variable gets one small function with its default; no module reads os.environ for EMBER_*.
"""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """Where ember keeps what it builds (the demo model): $EMBER_CACHE_DIR or ~/.cache/ember."""
    value = os.environ.get("EMBER_CACHE_DIR")
    return Path(value).expanduser() if value else Path.home() / ".cache" / "ember"


def fused_ops() -> bool:
    """Whether the decoder uses ember's fused Triton ops on a GPU: $EMBER_FUSED_OPS=1 (default
    off until measured on a GPU; see ember/model/triton_ops.py)."""
    return os.environ.get("EMBER_FUSED_OPS", "0") == "1"


def cpu_fused_ops() -> bool:
    """Whether the decoder uses ember's fused C ops on the CPU (ember/model/cpu_ops.py):
    on unless $EMBER_CPU_FUSED_OPS=0."""
    return os.environ.get("EMBER_CPU_FUSED_OPS", "1") != "0"
