"""StopChecker: finds a sequence's stop strings in its output text as the text grows.

Owns only the matching rule and the streaming hold-back; it neither detokenizes nor finishes
sequences (stop token ids and EOS are token-level checks made elsewhere).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class StopMatch:
    stop_str: str  # the stop string found (the sequence's stop_reason)
    truncate_to: int  # keep output_text[:truncate_to]; the sequence then finishes


class StopChecker:
    """Stop-string matching for one sequence, called once per step with the text so far.

    Contract:
    * A match may span any number of deltas; only the tail that can hold a match ending in
      the new characters is searched, so each call costs O(new chars + longest stop string).
    * The first match to complete in the text wins (ties: the longer one), so the result does
      not depend on how the text was split into deltas.
    * The output keeps the text before the stop string (plus the stop string itself with
      `include_stop_str_in_output`); anything after it is dropped.
    * Until `min_tokens` output tokens exist, stop strings are ignored; an occurrence that
      completed before then is never matched later (vLLM's rule).
    * Streaming: withhold the last `num_holdback_chars` characters of the text from the
      client until the sequence finishes; then no text a client saw is ever truncated.
    """

    def __init__(
        self, stop: list[str], include_stop_str_in_output: bool = False, min_tokens: int = 0
    ) -> None:
        if not all(isinstance(s, str) and s for s in stop):
            raise ValueError(f"stop must be non-empty strings, got {stop!r}")
        if min_tokens < 0:
            raise ValueError(f"min_tokens must be >= 0, got {min_tokens!r}")
        # (stop string, its length), longest first: among matches ending at the same place,
        # the longer one starts first and wins.
        self._stop = [(s, len(s)) for s in sorted(dict.fromkeys(stop), key=len, reverse=True)]
        self._include_stop_str = include_stop_str_in_output
        self._min_tokens = min_tokens
        max_len = self._stop[0][1] if self._stop else 0
        # With the stop string kept, truncation only cuts text after it, which is never
        # older than the new delta: nothing needs holding back.
        self.num_holdback_chars = 0 if include_stop_str_in_output else max(0, max_len - 1)

    def check(self, text: str, num_new_chars: int, num_output_tokens: int) -> StopMatch | None:
        """`text`: all output text so far, whose last `num_new_chars` characters are new since
        the previous call; `num_output_tokens`: output tokens generated so far (incl. the new)."""
        if not self._stop or num_new_chars <= 0 or num_output_tokens < self._min_tokens:
            return None
        new_start = len(text) - num_new_chars
        best: tuple[int, int, str] | None = None  # (end, start, stop string)
        for stop_str, length in self._stop:
            # Only a match ending in the new characters can be new.
            start = text.find(stop_str, new_start - length + 1 if new_start >= length else 0)
            if start >= 0 and (best is None or start + length < best[0]):
                best = (start + length, start, stop_str)
        if best is None:
            return None
        end, start, stop_str = best
        return StopMatch(stop_str, end if self._include_stop_str else start)
