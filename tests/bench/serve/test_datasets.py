"""Prompt datasets: seeded random prompts of the asked lengths, exact lengths with a tokenizer,
and sessions whose history (system prompt, turns, answers, tool calls) grows turn by turn."""

from __future__ import annotations

import random

import pytest

from ember.bench.serve.config import ServeBenchConfig
from ember.bench.serve.datasets import (
    TextBuilder,
    random_dataset,
    sample_len,
    sessions_dataset,
)


def _cfg(**kw) -> ServeBenchConfig:
    return ServeBenchConfig(url="http://127.0.0.1:1", **kw)


def test_random_dataset_is_seeded_and_within_ranges() -> None:
    cfg = _cfg(num_prompts=50, input_len=40, output_len=20, range_ratio=0.5, seed=3)
    a, b = random_dataset(cfg, TextBuilder()), random_dataset(cfg, TextBuilder())
    c = random_dataset(_cfg(num_prompts=50, input_len=40, output_len=20, range_ratio=0.5,
                            seed=4), TextBuilder())
    assert a == b and a != c
    assert [r.request_idx for r in a] == list(range(50))
    assert all(20 <= len(r.prompt.split()) <= 60 for r in a)
    assert all(10 <= r.max_tokens <= 30 for r in a)
    assert len({r.prompt for r in a}) == 50
    assert a[0].messages() == [{"role": "user", "content": a[0].prompt}]
    assert all(r.num_prompt_tokens is None for r in a)


def test_sample_len_bounds() -> None:
    rng = random.Random(0)
    assert {sample_len(rng, 100, 0.0) for _ in range(20)} == {100}
    values = [sample_len(rng, 100, 0.2) for _ in range(2000)]
    assert min(values) == 80 and max(values) == 120
    assert sample_len(rng, 1, 0.9) == 1


class _CharTokenizer:
    """One token per character: encode/decode round-trip, lengths easy to check."""

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return [ord(c) for c in text]

    def decode(self, ids: list[int]) -> str:
        return "".join(chr(i) for i in ids)


@pytest.mark.parametrize("num_tokens", [1, 7, 100, 513])
def test_text_has_exact_length_with_a_tokenizer(num_tokens: int) -> None:
    builder = TextBuilder(_CharTokenizer())
    text = builder.text(random.Random(0), num_tokens)
    assert len(text) == num_tokens
    assert builder.num_tokens(text) == num_tokens


def test_exact_lengths_with_a_bpe_tokenizer(tmp_path) -> None:
    from ember.model.demo_tokenizer import save_demo_tokenizer
    from ember.model.tokenizer import load_tokenizer

    save_demo_tokenizer(tmp_path, 1024)
    tok = load_tokenizer(tmp_path)
    builder = TextBuilder(tok)
    rng = random.Random(0)
    for num_tokens in (1, 5, 64, 300, 4000):
        text = builder.text(rng, num_tokens)
        assert len(tok.encode(text, add_special_tokens=False)) == num_tokens
    reqs = random_dataset(_cfg(num_prompts=10, input_len=64, range_ratio=0.5), builder)
    assert all(32 <= r.num_prompt_tokens <= 96 for r in reqs)


def test_sessions_share_the_system_prompt_and_respect_the_budget() -> None:
    cfg = _cfg(dataset="sessions", num_prompts=10, turns=4, system_prompt_len=300,
               input_len=20)
    sessions = sessions_dataset(cfg, TextBuilder())
    assert [len(s.turns) for s in sessions] == [4, 4, 2]
    assert len({s.session_id for s in sessions}) == 3
    assert len({s.system_prompt for s in sessions}) == 1
    assert len(sessions[0].system_prompt.split()) == 300
    assert all(s.turns[0].kind == "user" for s in sessions)
    assert sessions_dataset(cfg, TextBuilder()) == sessions_dataset(cfg, TextBuilder())
    capped = sessions_dataset(_cfg(dataset="sessions", num_prompts=100, sessions=2, turns=3),
                              TextBuilder())
    assert [len(s.turns) for s in capped] == [3, 3]


def test_session_history_grows_with_answers_and_tool_calls() -> None:
    cfg = _cfg(dataset="sessions", num_prompts=40, sessions=1, turns=40,
               system_prompt_len=10, input_len=5)
    (session,) = sessions_dataset(cfg, TextBuilder())
    kinds = {t.kind for t in session.turns}
    assert kinds == {"user", "tool"}
    previous, previous_prompt = None, None
    for idx, turn in enumerate(session.turns):
        messages = session.messages(idx)
        prompt = session.prompt(idx)
        assert messages[0] == {"role": "system", "content": session.system_prompt}
        assert len(messages) == 2 + 2 * idx
        last = messages[-1]
        if turn.kind == "tool":
            call = messages[-2]["tool_calls"][0]
            assert messages[-2]["role"] == "assistant"
            assert last == {"role": "tool", "tool_call_id": call["id"], "content": turn.content}
            assert call["type"] == "function" and call["function"]["name"]
        else:
            assert last == {"role": "user", "content": turn.content}
        if previous is not None:  # history is append-only: a shared prefix for the cache
            assert messages[:len(previous)] == previous
            assert messages[len(previous)]["content"] == f"answer {idx - 1}"
            assert prompt.startswith(previous_prompt)
        with pytest.raises(ValueError, match="before its previous answer"):
            session.messages(idx + 1)
        session.add_answer(f"answer {idx}")
        previous, previous_prompt = messages, prompt
