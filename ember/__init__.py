"""ember: an open LLM serving stack. `from ember import LLM, SamplingParams`."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

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
