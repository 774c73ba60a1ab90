"""Tokenizer loading: the demo tokenizer round-trips; a dir without one gets a clear error."""

from __future__ import annotations

import pytest

from ember.model.demo_tokenizer import save_demo_tokenizer
from ember.model.tokenizer import load_tokenizer


def test_loads_demo_tokenizer_with_chat_template(tmp_path):
    save_demo_tokenizer(tmp_path, vocab_size=512)
    tokenizer = load_tokenizer(tmp_path)
    ids = tokenizer("hello world", add_special_tokens=False).input_ids
    assert tokenizer.decode(ids) == "hello world"
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                           add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>assistant\n")
    assert tokenizer.eos_token == "<|im_end|>"


def test_missing_tokenizer_names_the_files(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="no tokenizer.*tokenizer.json"):
        load_tokenizer(tmp_path)
    with pytest.raises(ValueError, match="does not exist"):
        load_tokenizer(tmp_path / "missing")


def test_broken_tokenizer_is_a_value_error(tmp_path):
    (tmp_path / "tokenizer.json").write_text("{broken")
    with pytest.raises(ValueError, match="could not load the tokenizer"):
        load_tokenizer(tmp_path)
