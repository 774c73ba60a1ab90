"""Builds a byte-level BPE tokenizer trained locally (no network) with a ChatML chat template.

Used by the demo model and by the tests' tiny models; deterministic for a given size.
"""

from __future__ import annotations

import random
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
BOS, EOS, PAD = "<s>", "<|im_end|>", "<pad>"

# ChatML with Hermes-style tool calling: tools are listed in the system turn, a call is
# `<tool_call>\n{"name": ..., "arguments": {...}}\n</tool_call>`, a result is a `tool` turn.
TOOL_CALL_START, TOOL_CALL_END = "<tool_call>", "</tool_call>"
CHAT_TEMPLATE = (
    "{%- macro text(content) -%}"
    "{%- if content is string -%}{{ content }}"
    "{%- elif content -%}{%- for part in content -%}"
    "{%- if part['type'] == 'text' -%}{{ part['text'] }}{%- endif -%}{%- endfor -%}{%- endif -%}"
    "{%- endmacro -%}"
    "{%- if tools -%}"
    "{{ '<|im_start|>system\n' }}"
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{{ text(messages[0]['content']) + '\n\n' }}{%- endif -%}"
    "{{ 'Tools you may call, one JSON signature per line:\n<tools>\n' }}"
    "{%- for tool in tools -%}{{ tool | tojson }}{{ '\n' }}{%- endfor -%}"
    "{{ '</tools>\nTo call one, answer with <tool_call>\n{\"name\": <name>, "
    "\"arguments\": <JSON object>}\n</tool_call> for each call.<|im_end|>\n' }}"
    "{%- endif -%}"
    "{%- for message in messages -%}"
    "{%- if not (tools and loop.first and message['role'] == 'system') -%}"
    "{{ '<|im_start|>' + message['role'] + '\n' + text(message['content']) }}"
    "{%- for call in message.get('tool_calls') or [] -%}"
    "{%- set args = call['function']['arguments'] -%}"
    "{{ '<tool_call>\n{\"name\": ' + (call['function']['name'] | tojson) + ', \"arguments\": ' }}"
    "{{- (args if args is string else (args | tojson)) + '}\n</tool_call>' }}"
    "{%- endfor -%}"
    "{{ '<|im_end|>\n' }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\n' }}{%- endif -%}"
)

_WORDS = (
    "the a an of to in and or is are was were be been being have has had do does did "
    "model token cache block prefill decode batch request stream server router engine "
    "attention layer weight matrix vector tensor kernel memory latency throughput "
    "hello world python serving fast small large open source user assistant system tool "
    "call function json schema value key list number string true false null "
    "café naïve über straße Größe déjà 日本語 中文 你好 世界 한국어 русский язык "
    "emoji 😀 🚀 ✨ 🔥 — – … « » ¿ ¡ € £ ¥ 0 1 2 3 4 5 6 7 8 9 10 42 100 2026 "
    "{ } [ ] ( ) < > : ; , . ! ? ' \" / \\ - _ + = * & % $ # @ ~ ` |"
).split()


_SYLLABLES = [c + v for c in "bcdfghjklmnprstvwz" for v in "aeiou"] + ["th", "ng", "st", "er"]


def _pseudo_word(rng: random.Random) -> str:
    return "".join(rng.choices(_SYLLABLES, k=rng.randint(1, 4)))


def _corpus(num_lines: int, seed: int = 0) -> list[str]:
    """Real-looking words and many pseudo-words, so BPE can learn up to ~32k merges."""
    rng = random.Random(seed)
    lines = []
    for _ in range(num_lines):
        words = [w if rng.random() < 0.5 else _pseudo_word(rng)
                 for w in rng.choices(_WORDS, k=rng.randint(4, 24))]
        lines.append(" ".join(words))
    return lines


def train_bpe_tokenizer(vocab_size: int = 1024) -> Tokenizer:
    """A byte-level BPE (GPT-2/Llama-3 style) with ChatML special tokens."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_corpus(num_lines=max(4000, vocab_size * 4)), trainer=trainer)
    return tokenizer


def save_demo_tokenizer(out_dir: str | Path, vocab_size: int = 1024) -> int:
    """Train and save tokenizer.json + tokenizer_config.json (with chat template); returns size."""
    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(
        tokenizer_object=train_bpe_tokenizer(vocab_size),
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        chat_template=CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False,
    )
    fast.save_pretrained(str(out_dir))
    return len(fast)
