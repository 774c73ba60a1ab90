"""Where Triton kernels run in tests: on CPU tensors under triton's interpreter (conftest.py
sets TRITON_INTERPRET=1), else on the GPU; a module with neither is skipped."""

from __future__ import annotations

import pytest
import torch


def triton_device(is_interpreted: bool) -> torch.device:
    """The device for a kernel module's tests; skips the calling module when there is none."""
    if not is_interpreted and not torch.cuda.is_available():
        pytest.skip("no GPU and TRITON_INTERPRET is not 1", allow_module_level=True)
    return torch.device("cpu" if is_interpreted else "cuda")


def needs_compiled_gpu(is_interpreted: bool) -> pytest.MarkDecorator:
    return pytest.mark.skipif(not torch.cuda.is_available() or is_interpreted,
                              reason="needs a CUDA GPU with compiled (not interpreted) kernels")
