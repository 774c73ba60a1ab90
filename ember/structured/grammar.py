"""Compiles `GrammarSpec`s into xgrammar grammars for one model's vocabulary, with an LRU cache.

Loads the tokenizer and imports xgrammar on the first compile only; never touches logits.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections import OrderedDict
from pathlib import Path
from typing import TYPE_CHECKING

from ember.structured.spec import GrammarSpec

if TYPE_CHECKING:
    import xgrammar as xgr

logger = logging.getLogger(__name__)

# xgrammar's C++ errors open with "[hh:mm:ss] /path/file.cc:123: " (and sometimes a failed
# check's text); users need only the message after it.
_CPP_PREFIX = re.compile(r"^\[[\d:]+\] \S+:\d+: (Check failed: .*? is false: )?")
_WHAT = {"json": "JSON schema", "json_object": "JSON object grammar", "regex": "regex",
         "grammar": "EBNF grammar", "structural_tag": "structural tag"}


class GrammarCache:
    """Compiled grammars by spec (least recently used evicted past `max_entries`)."""

    def __init__(self, model_dir: str | Path, vocab_size: int, eos_token_ids: list[int],
                 max_entries: int = 256) -> None:
        self.model_dir = model_dir
        self.vocab_size = vocab_size  # the logits width, which may exceed the tokenizer's
        self.eos_token_ids = list(eos_token_ids)
        self.max_entries = max_entries
        self._compiler: xgr.GrammarCompiler | None = None
        self._compiler_lock = threading.Lock()
        self._cache: OrderedDict[GrammarSpec, xgr.CompiledGrammar] = OrderedDict()

    def __len__(self) -> int:
        return len(self._cache)

    def get(self, spec: GrammarSpec) -> xgr.CompiledGrammar:
        """The compiled grammar; ValueError naming the problem if the spec does not compile."""
        grammar = self._cache.get(spec)
        if grammar is not None:
            self._cache.move_to_end(spec)
            return grammar
        compiler = self._get_compiler()
        start = time.perf_counter()
        try:
            grammar = _compile(compiler, spec)
        except Exception as exc:  # xgrammar raises RuntimeError/pydantic errors for bad input
            message = _CPP_PREFIX.sub("", str(exc).strip())
            raise ValueError(f"structured_output[{spec.kind!r}] is not a valid "
                             f"{_WHAT[spec.kind]}: {message}") from exc
        logger.debug("compiled a %s grammar in %.1f ms", spec.kind,
                     (time.perf_counter() - start) * 1e3)
        self._cache[spec] = grammar
        if len(self._cache) > self.max_entries:
            self._cache.popitem(last=False)
        return grammar

    def preload_in_background(self) -> None:
        """Import xgrammar and build the vocabulary's compiler on a thread (~2-4 s on a CPU),
        so the first structured request does not stall the engine loop for that long."""
        def preload() -> None:
            try:
                self._get_compiler()
            except Exception as exc:  # the first structured request will raise it properly
                logger.warning("preloading the grammar compiler failed: %s", exc)

        threading.Thread(target=preload, name="ember-grammar-preload", daemon=True).start()

    def _get_compiler(self) -> xgr.GrammarCompiler:
        with self._compiler_lock:
            if self._compiler is None:
                self._compiler = self._build_compiler()
            return self._compiler

    def _build_compiler(self) -> xgr.GrammarCompiler:
        import xgrammar as xgr

        from ember.model.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(self.model_dir)
        info = xgr.TokenizerInfo.from_huggingface(
            tokenizer, vocab_size=self.vocab_size, stop_token_ids=self.eos_token_ids or None)
        # NOTE: xgrammar's own cache is unbounded; ours is the bounded one.
        return xgr.GrammarCompiler(info, cache_enabled=False)


def _compile(compiler: xgr.GrammarCompiler, spec: GrammarSpec) -> xgr.CompiledGrammar:
    import xgrammar as xgr

    if spec.kind == "regex":
        return compiler.compile_regex(spec.source)
    if spec.kind == "grammar":
        return compiler.compile_grammar(spec.source)
    if spec.kind == "json":
        grammar = xgr.Grammar.from_json_schema(spec.source, any_whitespace=spec.any_whitespace)
    elif spec.kind == "json_object":
        # NOTE: not the builtin JSON grammar, which allows unbounded whitespace.
        grammar = xgr.Grammar.from_json_schema('{"type": "object"}',
                                               any_whitespace=spec.any_whitespace)
    elif spec.kind == "structural_tag":
        grammar = xgr.Grammar.from_structural_tag(spec.source)
    else:
        raise ValueError(f"structured_output kind {spec.kind!r} is not supported")
    return compiler.compile_grammar(_forbid_raw_control_chars(grammar))


# NOTE: xgrammar 0.2.8 writes the characters of a JSON string that has minLength/maxLength as
# the EBNF class below, which lets raw control characters (U+0000-U+001F) through: invalid JSON
# that json.loads refuses. Its unbounded strings use the right class, which this restores.
_LOOSE_STRING_CHAR = r'[^\"\\\r\n]'
_JSON_STRING_CHAR = r'[^\"\\\0-\x1f]'


def _forbid_raw_control_chars(grammar: xgr.Grammar) -> xgr.Grammar | str:
    text = str(grammar)
    if _LOOSE_STRING_CHAR not in text:
        return grammar
    return text.replace(_LOOSE_STRING_CHAR, _JSON_STRING_CHAR)
