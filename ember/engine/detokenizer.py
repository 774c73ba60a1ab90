"""IncrementalDetokenizer: turns one output sequence's token ids into text deltas as they arrive.

Owns the per-sequence decode state; it never re-decodes the whole output on the hot path and
knows nothing of stop strings (see stop_checker.py).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING

from tokenizers import Tokenizer
from tokenizers.decoders import DecodeStream

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

_REPLACEMENT_CHAR = "\ufffd"
# Prompt tokens given to the decoder as left context. One clean token is enough for the
# decoders in use (ByteLevel, Metaspace, Replace/ByteFallback/Fuse/Strip); the cap bounds the
# one-off search at construction for prompts whose tail is special tokens or broken bytes.
_MAX_CONTEXT_TOKENS = 32
_MAX_UTF8_TOKENS = 3  # tokens a prompt may end with inside one character (<= 4 bytes)


class IncrementalDetokenizer:
    """Text deltas for one output sequence, fed token ids as they are sampled.

    Contract:
    * `add_tokens(ids)` returns only whole characters: a character whose bytes are split
      across tokens (byte-level BPE, `<0xNN>` byte fallback) is emitted once complete.
    * The deltas are the text the output adds after the prompt, i.e.
      `decode(prompt + output)[len(decode(prompt)):]` with this `skip_special_tokens` (and no
      `clean_up_tokenization_spaces`). For byte-level BPE that is `decode(output)`; for
      Metaspace/sentencepiece decoders it is `decode(output)` except that the first output
      token keeps its leading space (" Hello", as vLLM streams it), because the prompt is used
      as left context. With no prompt it is exactly `decode(output)`.
    * `add_tokens(...)` deltas followed by `flush()` concatenate to exactly that text whenever the
      output is valid UTF-8. For invalid byte sequences it never raises and never retracts
      text, but its U+FFFD replacements may differ from a full decode's (byte fallback
      replaces a whole byte run, including valid bytes already emitted, once it turns bad).
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase | Tokenizer,
        prompt_token_ids: Sequence[int],
        skip_special_tokens: bool = True,
    ) -> None:
        """`tokenizer`: a Hugging Face fast tokenizer (its `.backend_tokenizer` is used) or a
        `tokenizers.Tokenizer`. `prompt_token_ids`: the sequence's prompt, used as context."""
        backend = tokenizer if isinstance(tokenizer, Tokenizer) else tokenizer.backend_tokenizer
        self._backend: Tokenizer = backend
        self._skip_special_tokens = skip_special_tokens
        context_ids, pending_ids = _prompt_context(backend, list(prompt_token_ids),
                                                   skip_special_tokens)
        # NOTE: tokenizers' DecodeStream does the prefix/read-offset work in Rust: it decodes
        # only a window (the last emitted chunk's tokens, then those not emitted yet) and
        # emits text that does not end in U+FFFD. Its state cannot be read, and `flush()` and
        # the invalid-prefix recovery need the window, so `_ids` mirrors it: the last emitted
        # chunk (at first the prompt context), then from `_pending_start` the tokens whose
        # text is held back. Cost on the hot path: a list extend and a short `del`.
        self._ids: list[int] = context_ids + pending_ids
        self._pending_start = len(context_ids)
        self._stream = DecodeStream(ids=context_ids or None,
                                    skip_special_tokens=skip_special_tokens)
        if pending_ids:  # the prompt ends inside a character: the output completes it
            self._stream.step(backend, pending_ids)
        self._text = ""

    @property
    def text(self) -> str:
        """All output text emitted so far (the concatenation of the deltas)."""
        return self._text

    def add_tokens(self, token_ids: list[int]) -> str:
        """Appends sampled token ids; returns the new text ("" while a character is incomplete)."""
        if not token_ids:
            return ""
        self._ids.extend(token_ids)
        try:
            # A lone int crosses into Rust ~2x faster than a one-element list.
            step_ids = token_ids[0] if len(token_ids) == 1 else token_ids
            delta = self._stream.step(self._backend, step_ids)
        except Exception as exc:  # tokenizers raises a bare Exception for this case
            if "Invalid prefix" not in str(exc):
                raise
            delta = self._restart()
        if delta is None:
            return ""
        self._start_window_at_pending()
        # NOTE: `self._text += delta` copies the whole text every token (quadratic on long
        # outputs); with the attribute cleared, `text` is the only reference and CPython
        # appends in place.
        text, self._text = self._text, ""
        text += delta
        self._text = text
        return delta

    def flush(self) -> str:
        """Returns the text held back for an incomplete character (as U+FFFD, like a full
        decode). Call once when the sequence finishes; "" if nothing is held back."""
        if self._pending_start == len(self._ids):
            return ""
        emitted = self._decode(self._ids[: self._pending_start])
        text = self._decode(self._ids)
        delta = (text[len(emitted):] if text.startswith(emitted)
                 else self._decode(self._ids[self._pending_start:]))
        self._start_window_at_pending()
        self._text += delta
        return delta

    def decode_token(self, token_id: int) -> str:
        """One token decoded alone, special tokens kept (vLLM's `Logprob.decoded_token`).

        NOTE: a lone byte token decodes to U+FFFD and Metaspace drops a leading space of a lone
        token ("▁Hello" -> "Hello"), exactly like `tokenizer.decode([token_id])`."""
        return self._backend.decode([token_id], skip_special_tokens=False)

    def _start_window_at_pending(self) -> None:
        """After an emission the window is the chunk just emitted (as in DecodeStream)."""
        del self._ids[: self._pending_start]
        self._pending_start = len(self._ids)

    def _decode(self, token_ids: list[int]) -> str:
        return self._backend.decode(token_ids, skip_special_tokens=self._skip_special_tokens)

    def _restart(self) -> str | None:
        """Recovers from DecodeStream's "Invalid prefix" error.

        It is raised when a new token changes the text of tokens already emitted, which
        happens only for invalid UTF-8 under byte fallback (a bad byte run is replaced as a
        whole). Emitted text cannot be retracted, so decode the unemitted tokens afresh."""
        logger.debug("detokenizer: decode stream restarted after a non-monotonic decode")
        self._stream = DecodeStream(skip_special_tokens=self._skip_special_tokens)
        return self._stream.step(self._backend, self._ids[self._pending_start:])


def _prompt_context(
    backend: Tokenizer, prompt_ids: list[int], skip_special_tokens: bool
) -> tuple[list[int], list[int]]:
    """Splits the prompt's tail into (context, pending) to prime a DecodeStream.

    `context` is the shortest prompt suffix whose text is non-empty and free of U+FFFD (so it
    decodes the same alone as in the full prompt); DecodeStream only uses a context whose text
    does not end in U+FFFD. `pending` is a tail of at most 3 tokens ending inside a character
    (prompts given as token ids can); the output token that completes the character emits it.
    """
    def decode(ids: list[int]) -> str:
        return backend.decode(ids, skip_special_tokens=skip_special_tokens)

    for end in range(len(prompt_ids), max(0, len(prompt_ids) - _MAX_UTF8_TOKENS) - 1, -1):
        start_min = max(0, end - _MAX_CONTEXT_TOKENS)
        if end > start_min and not decode(prompt_ids[start_min:end]).endswith(_REPLACEMENT_CHAR):
            break
    else:  # no clean end (e.g. a prompt ending in a literal U+FFFD): decode without context
        return [], []
    pending = prompt_ids[end:]
    for start in range(end - 1, start_min - 1, -1):
        text = decode(prompt_ids[start:end])
        if text and _REPLACEMENT_CHAR not in text:
            return prompt_ids[start:end], pending
    return prompt_ids[start_min:end], pending
