"""ember: an open LLM serving stack. `from ember import LLM, SamplingParams`."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

# PyTorch's CPU allocator backs allocations of 2 MiB and more with transparent huge pages when
# this is set before its first allocation: loading (or decoding) weights into fresh tensors
# then takes 512x fewer page faults (a 250M-parameter model loads ~1.5x faster).
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

from ember.engine.outputs import CompletionOutput, Logprob, RequestOutput
from ember.engine.sampling_params import SamplingParams

if TYPE_CHECKING:
    from ember.engine.llm import LLM

__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput", "Logprob"]


def __getattr__(name: str) -> Any:
    # NOTE: LLM pulls in torch and transformers; `import ember` alone stays light.
    if name == "LLM":
        from ember.engine.llm import LLM

        return LLM
    raise AttributeError(f"module 'ember' has no attribute {name!r}")
