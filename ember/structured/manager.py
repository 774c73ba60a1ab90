"""StructuredOutputManager: the engine's `SamplingConstraint` for structured output.

Compiles a request's grammar at admission, keeps one xgrammar matcher per sequence (on the
Sequence, so it lives and dies with it), masks logits before sampling and advances matchers after.
Rows without structured output cost one attribute check; no xgrammar import until one arrives.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ember.engine.request import Request, Sequence
from ember.structured.grammar import GrammarCache
from ember.structured.spec import parse_spec

if TYPE_CHECKING:
    import xgrammar as xgr

logger = logging.getLogger(__name__)


class StructuredOutputManager:
    def __init__(self, model_dir: str | Path, vocab_size: int, eos_token_ids: list[int],
                 max_cached_grammars: int = 256) -> None:
        self.vocab_size = vocab_size
        self.eos_token_ids = list(eos_token_ids)
        self.grammars = GrammarCache(model_dir, vocab_size, eos_token_ids, max_cached_grammars)

    def admit(self, request: Request) -> None:
        spec = request.params.structured_output
        if spec is not None:
            request.constraint = self.grammars.get(parse_spec(spec))

    def mask_logits_(self, seqs: list[Sequence], logits: torch.Tensor) -> None:
        rows = [i for i, seq in enumerate(seqs) if seq.request.constraint is not None]
        if not rows:
            return
        import xgrammar as xgr

        # NOTE: one bitmask row per logits row, filled only for constrained rows (apply's
        # `indices` skips the rest); [R, ceil(vocab / 32)] int32 is R * vocab / 8 bytes.
        bitmask = xgr.allocate_token_bitmask(len(seqs), self.vocab_size)  # [R, W] on the CPU
        for i in rows:
            _matcher(seqs[i], self.eos_token_ids).fill_next_token_bitmask(bitmask, i)
        bitmask = bitmask.to(logits.device, non_blocking=True)
        xgr.apply_token_bitmask_inplace(logits, bitmask, vocab_size=self.vocab_size,
                                        indices=None if len(rows) == len(seqs) else rows)

    def accept_tokens(self, seqs: list[Sequence], token_ids: list[int]) -> list[bool]:
        is_done = [False] * len(seqs)
        for i, seq in enumerate(seqs):
            matcher: xgr.GrammarMatcher | None = seq.constraint_state
            if matcher is None:
                continue
            if not matcher.accept_token(token_ids[i]):
                # Cannot happen while logits are masked; stop rather than emit invalid output.
                logger.error("request %s: sampled token %d is outside its grammar; stopping it",
                             seq.request.request_id, token_ids[i])
                is_done[i] = True
            elif matcher.is_terminated():
                is_done[i] = True
        return is_done

    @property
    def num_cached_grammars(self) -> int:
        return len(self.grammars)


def _matcher(seq: Sequence, eos_token_ids: list[int]) -> xgr.GrammarMatcher:
    """The sequence's matcher, created on its first sample (each of n sequences gets its own).

    Its stop tokens are the request's (EOS unless ignore_eos, plus stop_token_ids), else the
    model's EOS; with none at all the grammar ends itself once complete.
    """
    if seq.constraint_state is None:
        import xgrammar as xgr

        stop_ids = seq.request.sorted_stop_token_ids or eos_token_ids
        seq.constraint_state = xgr.GrammarMatcher(
            seq.request.constraint, override_stop_tokens=stop_ids or None,
            terminate_without_stop_token=not stop_ids)
    return seq.constraint_state
