"""Loads a model directory's tokenizer through transformers' AutoTokenizer.

Never runs remote code; a directory without tokenizer files gets an error saying what was sought.
"""

from __future__ import annotations

from pathlib import Path

from transformers import AutoTokenizer, PreTrainedTokenizerBase

# Any one of these makes a loadable tokenizer (fast json, sentencepiece, or BPE vocab + merges).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")


def load_tokenizer(model_dir: str | Path) -> PreTrainedTokenizerBase:
    path = Path(model_dir).expanduser()
    if not path.is_dir():
        raise ValueError(f"model directory {str(path)!r} does not exist or is not a directory")
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise ValueError(
            f"{path} has no tokenizer: expected one of {', '.join(TOKENIZER_FILES)}"
        )
    try:
        return AutoTokenizer.from_pretrained(str(path), trust_remote_code=False)
    except Exception as exc:  # transformers raises many types for a broken tokenizer
        raise ValueError(f"could not load the tokenizer in {path}: {exc}") from exc
