"""IncrementalDetokenizer vs full decodes, on locally trained byte-level and byte-fallback BPEs."""

from __future__ import annotations

import random

import pytest
from transformers import AutoTokenizer

from ember.engine.detokenizer import IncrementalDetokenizer
from ember.model.demo_tokenizer import save_demo_tokenizer
from tests.factories import save_sentencepiece_tokenizer

TEXTS = [
    "Hello, world! café naïve Größe déjà vu e\u0301",
    "日本語 中文 你好世界 한국어 🦀龍𝔘 😀🚀✨ 🔥 👨‍👩‍👧",
    "  leading spaces,\ttabs\tand\nnew\n\nlines   trailing  ",
    "mixed <|im_end|> special <s> tokens</s>inline 🦀<|im_end|>龍",
    "€£¥ «quotes» — dashes… ¿¡ 42 { \"json\": [1, 2] }",
]
PROMPT = "<|im_start|>user\nSay something<|im_end|>\n<|im_start|>assistant\n"
KINDS = ["byte_level", "sentencepiece", "sentencepiece_llama"]


@pytest.fixture(scope="module", params=KINDS)
def kind_and_tokenizer(request, tmp_path_factory):
    out_dir = tmp_path_factory.mktemp(request.param)
    if request.param == "byte_level":
        save_demo_tokenizer(out_dir, vocab_size=1024)
    else:
        decoder = "llama" if request.param == "sentencepiece_llama" else "metaspace"
        save_sentencepiece_tokenizer(out_dir, vocab_size=1024, decoder=decoder)
    return request.param, AutoTokenizer.from_pretrained(str(out_dir))


@pytest.fixture(scope="module")
def sp_tokenizer(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("sp")
    save_sentencepiece_tokenizer(out_dir, vocab_size=1024)
    return AutoTokenizer.from_pretrained(str(out_dir))


def _stream(tokenizer, prompt_ids, output_ids, skip, chunk=1):
    det = IncrementalDetokenizer(tokenizer, prompt_ids, skip_special_tokens=skip)
    deltas = [det.add_tokens(output_ids[i:i + chunk]) for i in range(0, len(output_ids), chunk)]
    deltas.append(det.flush())
    assert "".join(deltas) == det.text
    return deltas


def _expected(tokenizer, prompt_ids, output_ids, skip):
    """The text the output adds after the prompt (None if it rewrites the prompt's text)."""
    prompt_text = tokenizer.decode(prompt_ids, skip_special_tokens=skip)
    full = tokenizer.decode(prompt_ids + output_ids, skip_special_tokens=skip)
    return full[len(prompt_text):] if full.startswith(prompt_text) else None


def test_texts_exercise_split_characters(kind_and_tokenizer):
    kind, tokenizer = kind_and_tokenizer
    ids = tokenizer(" ".join(TEXTS), add_special_tokens=False).input_ids
    pieces = [tokenizer.decode([i]) for i in ids]
    assert sum("\ufffd" in p for p in pieces) >= 4  # tokens holding part of a character
    if kind != "byte_level":
        assert any(t.startswith("<0x") for t in tokenizer.convert_ids_to_tokens(ids))


@pytest.mark.parametrize("skip", [True, False])
@pytest.mark.parametrize("text", TEXTS)
def test_one_token_at_a_time_matches_full_decode(kind_and_tokenizer, text, skip):
    kind, tokenizer = kind_and_tokenizer
    output_ids = tokenizer(text, add_special_tokens=False).input_ids
    full = tokenizer.decode(output_ids, skip_special_tokens=skip)
    assert "\ufffd" not in full

    deltas = _stream(tokenizer, [], output_ids, skip)
    assert not any("\ufffd" in d for d in deltas)
    assert "".join(deltas) == full
    assert deltas[-1] == ""  # flush: nothing held back for a complete text

    prompt_ids = tokenizer(PROMPT, add_special_tokens=False).input_ids
    in_context = "".join(_stream(tokenizer, prompt_ids, output_ids, skip))
    assert in_context == _expected(tokenizer, prompt_ids, output_ids, skip)
    if kind == "byte_level":
        assert in_context == full
    else:  # only the first token's leading space, kept in context, may differ
        assert in_context.endswith(full) and not in_context[: len(in_context) - len(full)].strip()


@pytest.mark.parametrize("chunk", [2, 3, 7])
def test_several_tokens_per_step(kind_and_tokenizer, chunk):
    _, tokenizer = kind_and_tokenizer
    output_ids = tokenizer(" ".join(TEXTS), add_special_tokens=False).input_ids
    prompt_ids = tokenizer(PROMPT, add_special_tokens=False).input_ids
    deltas = _stream(tokenizer, prompt_ids, output_ids, True, chunk)
    assert not any("\ufffd" in d for d in deltas)
    assert "".join(deltas) == _expected(tokenizer, prompt_ids, output_ids, True)


def test_prompt_context_keeps_leading_space(sp_tokenizer):
    prompt_ids = sp_tokenizer("Question: why?", add_special_tokens=False).input_ids
    output_ids = sp_tokenizer("Because café", add_special_tokens=False).input_ids
    assert sp_tokenizer.convert_ids_to_tokens(output_ids)[0].startswith("\u2581")
    assert sp_tokenizer.decode(output_ids) == "Because café"
    assert "".join(_stream(sp_tokenizer, prompt_ids, output_ids, True)) == " Because café"


def test_flush_emits_an_unfinished_character(kind_and_tokenizer):
    _, tokenizer = kind_and_tokenizer
    ids = tokenizer("ok 🦀", add_special_tokens=False).input_ids
    output_ids = ids[:-1]  # the crab's last byte never arrives
    det = IncrementalDetokenizer(tokenizer, [], skip_special_tokens=True)
    streamed = "".join(det.add_tokens([i]) for i in output_ids)
    assert "\ufffd" not in streamed
    tail = det.flush()
    assert tail.endswith("\ufffd")
    assert streamed + tail == det.text == tokenizer.decode(output_ids)
    assert det.flush() == ""


def test_prompt_ending_inside_a_character(sp_tokenizer):
    ids = sp_tokenizer("Hi 🦀 there", add_special_tokens=False).input_ids
    tokens = sp_tokenizer.convert_ids_to_tokens(ids)
    split = tokens.index("<0xA6>")  # prompt ends after 2 of the crab's 4 bytes
    det = IncrementalDetokenizer(sp_tokenizer, ids[:split], skip_special_tokens=True)
    deltas = [det.add_tokens([i]) for i in ids[split:]]
    assert deltas[:2] == ["", "🦀"]
    assert det.text == "🦀 there"


def test_random_token_ids_never_raise(kind_and_tokenizer):
    kind, tokenizer = kind_and_tokenizer
    rng = random.Random(0)
    prompt_ids = tokenizer(PROMPT, add_special_tokens=False).input_ids
    num_exact = 0
    for _ in range(300):
        output_ids = [rng.randrange(len(tokenizer)) for _ in range(rng.randint(1, 24))]
        skip = rng.random() < 0.5
        text = "".join(_stream(tokenizer, prompt_ids, output_ids, skip))
        expected = _expected(tokenizer, prompt_ids, output_ids, skip)
        num_exact += text == expected
        # Byte fallback replaces a whole invalid byte run (valid bytes already streamed
        # included, even the prompt's), which no stream can match without retracting text.
        if kind == "byte_level" or (expected is not None and "\ufffd" not in expected):
            assert text == expected
    assert num_exact >= 150


def test_accepts_backend_tokenizer_and_decodes_single_tokens(kind_and_tokenizer):
    _, tokenizer = kind_and_tokenizer
    ids = tokenizer("hello 🦀<|im_end|>", add_special_tokens=False).input_ids
    det = IncrementalDetokenizer(tokenizer.backend_tokenizer, [], skip_special_tokens=False)
    assert "".join(det.add_tokens([i]) for i in ids) == tokenizer.decode(ids)
    for token_id in ids:
        assert det.decode_token(token_id) == tokenizer.decode([token_id])
    assert det.decode_token(ids[-1]) == "<|im_end|>"
