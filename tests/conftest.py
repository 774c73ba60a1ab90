"""Tests run the Triton kernels in triton's CPU interpreter when there is no GPU.

NOTE: triton reads TRITON_INTERPRET when a kernel is decorated, so it is set here, before any
test module imports ember.attention.triton_kernels.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
