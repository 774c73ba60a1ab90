"""What `ember bench serve` sends: seeded random prompts, and multi-turn agent sessions.

Pure Python, no network: sessions keep their history here, growing with the answers received.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from typing import Any, Protocol

from ember.bench.serve.config import ServeBenchConfig

_WORDS = (
    "the of and to in is was for that on with as by at from it an be this are or have not "
    "which one all their has were there been more when will would can some time into other "
    "what about than them these only two may first new any could where after most also made "
    "over such our system model token cache request server batch memory block latency stream "
    "queue prompt output input value table record result error state file path test build run "
    "data user agent tool call search read write update check list open close start stop send "
    "river mountain garden window paper music light water stone city market winter summer green"
).split()
_TOOL_NAMES = ("search", "read_file", "run_tests", "list_dir")


class Tokenizer(Protocol):
    def encode(self, text: str, add_special_tokens: bool = ...) -> list[int]: ...
    def decode(self, ids: list[int]) -> str: ...


class TextBuilder:
    """Builds text of a target length: exactly that many tokens with a tokenizer, else words."""

    def __init__(self, tokenizer: Tokenizer | None = None) -> None:
        self.tokenizer = tokenizer

    def words(self, rng: random.Random, num_words: int) -> str:
        return " ".join(rng.choices(_WORDS, k=num_words))

    def text(self, rng: random.Random, num_tokens: int) -> str:
        text = self.words(rng, num_tokens)
        if self.tokenizer is None or num_tokens == 0:
            return text
        # NOTE: decode(encode(x)) need not re-encode to the same length; a few rounds converge.
        for _ in range(8):
            ids = self.tokenizer.encode(text, add_special_tokens=False)
            if len(ids) == num_tokens:
                break
            if len(ids) > num_tokens:
                text = self.tokenizer.decode(ids[:num_tokens])
            else:
                text = text + " " + self.words(rng, num_tokens - len(ids))
        return text

    def num_tokens(self, text: str) -> int | None:
        if self.tokenizer is None:
            return None
        return len(self.tokenizer.encode(text, add_special_tokens=False))


def sample_len(rng: random.Random, length: int, range_ratio: float) -> int:
    """A length uniform in [length*(1-r), length*(1+r)], at least 1."""
    low = max(1, int(length * (1 - range_ratio)))
    high = max(low, int(length * (1 + range_ratio)))
    return rng.randint(low, high)


@dataclass(frozen=True)
class RandomRequest:
    request_idx: int
    prompt: str
    max_tokens: int
    num_prompt_tokens: int | None  # by the tokenizer, when one was given

    def messages(self) -> list[dict[str, Any]]:
        return [{"role": "user", "content": self.prompt}]


def random_dataset(cfg: ServeBenchConfig, builder: TextBuilder) -> list[RandomRequest]:
    rng = random.Random(cfg.seed)
    requests = []
    for idx in range(cfg.num_prompts):
        prompt = builder.text(rng, sample_len(rng, cfg.input_len, cfg.range_ratio))
        requests.append(RandomRequest(idx, prompt, sample_len(rng, cfg.output_len,
                                                                cfg.range_ratio),
                                      builder.num_tokens(prompt)))
    return requests


@dataclass(frozen=True)
class Turn:
    kind: str  # "user": a user message; "tool": a tool result answering a call made last turn
    content: str
    max_tokens: int
    tool_call: dict[str, Any] | None = None  # the call the previous assistant message made


@dataclass
class Session:
    """One conversation: its turns are fixed up front, its answers arrive while it runs."""

    session_id: str
    system_prompt: str
    turns: list[Turn]
    answers: list[str] = field(default_factory=list)

    def messages(self, turn_idx: int) -> list[dict[str, Any]]:
        """OpenAI chat messages for `turn_idx`: system, then each earlier turn and its answer."""
        if turn_idx != len(self.answers):
            raise ValueError(f"turn {turn_idx} of {self.session_id} before its previous answer")
        messages: list[dict[str, Any]] = [{"role": "system", "content": self.system_prompt}]
        for idx in range(turn_idx + 1):
            turn = self.turns[idx]
            if turn.kind == "tool":
                messages.append({"role": "tool", "tool_call_id": turn.tool_call["id"],
                                 "content": turn.content})
            else:
                messages.append({"role": "user", "content": turn.content})
            if idx < turn_idx:
                messages.append(self._assistant(idx))
        return messages

    def prompt(self, turn_idx: int) -> str:
        """The same history as plain text, for the completions endpoint (prefix-stable)."""
        lines = []
        for msg in self.messages(turn_idx):
            text = f"{msg['role'].capitalize()}: {msg.get('content') or ''}"
            for call in msg.get("tool_calls", ()):
                fn = call["function"]
                text += f"\n<tool_call id={call['id']}>{fn['name']}({fn['arguments']})</tool_call>"
            lines.append(text)
        return "\n\n".join(lines) + "\n\nAssistant:"

    def add_answer(self, text: str) -> None:
        self.answers.append(text)

    def _assistant(self, idx: int) -> dict[str, Any]:
        msg: dict[str, Any] = {"role": "assistant", "content": self.answers[idx]}
        following = self.turns[idx + 1] if idx + 1 < len(self.turns) else None
        if following is not None and following.kind == "tool":
            msg["tool_calls"] = [following.tool_call]
        return msg


def sessions_dataset(cfg: ServeBenchConfig, builder: TextBuilder) -> list[Session]:
    """`num_sessions` sessions of `turns` turns, cut so that all turns total <= num_prompts."""
    rng = random.Random(cfg.seed)
    system_prompt = builder.text(rng, cfg.system_prompt_len)
    sessions, budget = [], cfg.num_prompts
    for s in range(cfg.num_sessions):
        if budget == 0:
            break
        session_id = f"session-{cfg.seed}-{s}"
        turns = []
        for t in range(min(cfg.turns, budget)):
            content = builder.text(rng, sample_len(rng, cfg.input_len, cfg.range_ratio))
            max_tokens = sample_len(rng, cfg.output_len, cfg.range_ratio)
            if t > 0 and rng.random() < 0.5:
                name = rng.choice(_TOOL_NAMES)
                call = {"id": f"call_{s}_{t}", "type": "function",
                        "function": {"name": name,
                                     "arguments": json.dumps({"query": builder.words(rng, 3)})}}
                turns.append(Turn("tool", content, max_tokens, call))
            else:
                turns.append(Turn("user", content, max_tokens))
        budget -= len(turns)
        sessions.append(Session(session_id, system_prompt, turns))
    return sessions
