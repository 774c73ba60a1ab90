"""The sampling-constraint hook: what an optional feature that restricts which tokens a sequence
may sample (structured output) must provide. The engine calls it at admission and around the
sampler, nowhere else.
"""

from __future__ import annotations

from typing import Protocol

import torch

from ember.engine.request import Request, Sequence


class SamplingConstraint(Protocol):
    def admit(self, request: Request) -> None:
        """Prepare the request's constraint (if it has one) before it is queued.

        Raises ValueError naming the problem when it cannot be honoured (the request is refused).
        """

    def mask_logits_(self, seqs: list[Sequence], logits: torch.Tensor) -> None:
        """Before sampling: set logits[i] to -inf for each token seqs[i] may not sample next.

        logits [len(seqs), vocab], edited in place. Must do no tensor work when no row is
        constrained.
        """

    def accept_tokens(self, seqs: list[Sequence], token_ids: list[int]) -> list[bool]:
        """After sampling: advance each constrained sequence by its token.

        Returns, per row, whether the constraint is complete and the sequence must stop there.
        """
