"""Shared test factories: tiny random model dirs, a minimal greedy runner, and the HF reference.

Plain functions only, no fixtures and no network; the engine's own tests may replace
`run_greedy` with the real runner but keep comparing against `hf_greedy`.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ember.attention.backend import BatchLayout, allocate_kv_cache
from ember.attention.context import ForwardContext, forward_context
from ember.attention.torch_backend import TorchBackend
from ember.model.decoder import DecoderModel
from ember.model.demo import build_random_model
from ember.model.loader import ModelInfo


def tiny_model_dir(root: str | Path, architecture: str = "LlamaForCausalLM",
                   **overrides: Any) -> Path:
    """A ~0.2M-parameter fp32 model of `architecture` under `root` (see build_random_model)."""
    name = overrides.pop("name", architecture)
    return build_random_model(Path(root) / name, architecture, **overrides)


@dataclass
class GreedyRun:
    new_token_ids: list[int]  # [max_new_tokens] greedy continuation
    logits: torch.Tensor  # [prompt_len + max_new_tokens - 1, vocab] float32, one row per position


def run_greedy(model: DecoderModel, info: ModelInfo, prompts: list[list[int]],
               max_new_tokens: int, *, block_size: int = 4, prefill_chunk: int | None = None,
               seed: int = 0) -> list[GreedyRun]:
    """Run all prompts as one batch through TorchBackend with a shuffled paged KV cache.

    Prefill (in chunks of `prefill_chunk` tokens if given; sequences whose prompt is done
    sit those steps out), then decode steps feeding each sequence its argmax token.
    """
    backend = TorchBackend()
    device = next(model.parameters()).device
    max_len = max(map(len, prompts)) + max_new_tokens
    blocks_per_seq = -(-max_len // block_size)
    num_blocks = blocks_per_seq * len(prompts)
    kv_caches = allocate_kv_cache(info.num_layers, num_blocks, block_size, info.num_kv_heads,
                                  info.head_dim, info.dtype, device, backend)
    free = list(range(num_blocks))
    random.Random(seed).shuffle(free)  # non-contiguous block tables exercise the paging
    tables = [[free.pop() for _ in range(blocks_per_seq)] for _ in prompts]
    tokens = [list(p) for p in prompts]
    computed = [0] * len(prompts)
    logits: list[list[torch.Tensor]] = [[] for _ in prompts]

    def step(chunks: dict[int, list[int]]) -> None:
        """One forward over {seq: new tokens}; appends each sequence's logits rows."""
        ids, positions, slots, query_lens, context_lens = [], [], [], [], []
        for s, chunk in chunks.items():
            span = range(computed[s], computed[s] + len(chunk))
            ids += chunk
            positions += span
            slots += [tables[s][p // block_size] * block_size + p % block_size for p in span]
            query_lens.append(len(chunk))
            context_lens.append(span.stop)
            computed[s] = span.stop
        layout = BatchLayout(query_lens, context_lens, [tables[s] for s in chunks],
                             torch.tensor(slots), block_size)
        ctx = ForwardContext(backend, backend.build_metadata(layout, device), kv_caches)
        with torch.inference_mode(), forward_context(ctx):
            hidden = model(torch.tensor(ids, device=device), torch.tensor(positions, device=device))
            out = model.compute_logits(hidden).cpu()  # [T, vocab]
        for s, rows in zip(chunks, out.split(query_lens)):
            logits[s].append(rows)

    chunk = prefill_chunk or max_len
    while any(computed[s] < len(p) for s, p in enumerate(prompts)):
        step({s: p[computed[s]:computed[s] + chunk]
              for s, p in enumerate(prompts) if computed[s] < len(p)})
    for i in range(max_new_tokens):
        next_ids = torch.stack([rows[-1][-1] for rows in logits]).argmax(-1).tolist()
        for s, token in enumerate(next_ids):
            tokens[s].append(token)
        if i + 1 < max_new_tokens:
            step({s: [token] for s, token in enumerate(next_ids)})
    return [GreedyRun(tokens[s][len(prompts[s]):], torch.cat(logits[s]))
            for s in range(len(prompts))]


def hf_greedy(model_dir: str | Path, prompts: list[list[int]], max_new_tokens: int,
              dtype: torch.dtype = torch.float32) -> list[GreedyRun]:
    """transformers' answer: `generate(do_sample=False)` tokens, then one full forward's logits."""
    from transformers import AutoModelForCausalLM, GenerationConfig

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype)
    model.eval()
    # NOTE: no eos at all (not min_new_tokens, which would mask eos out of the argmax).
    model.generation_config.eos_token_id = None
    gen_config = GenerationConfig(do_sample=False, max_new_tokens=max_new_tokens, pad_token_id=0)
    runs = []
    with torch.no_grad():
        for prompt in prompts:
            ids = torch.tensor([prompt])
            out = model.generate(ids, attention_mask=torch.ones_like(ids),
                                 generation_config=gen_config)
            new = out[0, len(prompt):].tolist()
            logits = model(out[:, :-1]).logits[0].float()  # [prompt + new - 1, vocab]
            runs.append(GreedyRun(new, logits))
    return runs


def save_sentencepiece_tokenizer(out_dir: str | Path, vocab_size: int = 1024,
                                 decoder: str = "metaspace") -> int:
    """A SentencePiece-style BPE ("▁" word prefix, <0xNN> byte fallback) with ChatML specials.

    `decoder` picks how it decodes: "metaspace" (ByteFallback + Metaspace) or "llama"
    (Replace ▁ -> space, ByteFallback, Fuse, Strip the first space). Returns the vocab size.
    """
    import json

    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from ember.model.demo_tokenizer import (
        BOS,
        CHAT_TEMPLATE,
        EOS,
        PAD,
        SPECIAL_TOKENS,
        _corpus,
    )

    byte_tokens = [f"<0x{b:02X}>" for b in range(256)]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - len(byte_tokens),
                                  special_tokens=SPECIAL_TOKENS, show_progress=False)
    base = Tokenizer(models.BPE())
    base.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first")
    base.train_from_iterator(_corpus(num_lines=max(4000, vocab_size * 4)), trainer=trainer)
    trained = json.loads(base.to_str())["model"]
    # Vocab order like Llama's: specials, the 256 byte tokens, then the learned pieces.
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS + byte_tokens)}
    for token, _ in sorted(trained["vocab"].items(), key=lambda item: item[1]):
        vocab.setdefault(token, len(vocab))
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in trained["merges"]]
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, byte_fallback=True))
    tokenizer.add_special_tokens(SPECIAL_TOKENS)
    if decoder == "llama":
        tokenizer.normalizer = normalizers.Sequence(
            [normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
        tokenizer.decoder = decoders.Sequence([
            decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
            decoders.Strip(" ", 1, 0)])
    elif decoder == "metaspace":
        tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581",
                                                           prepend_scheme="first")
        tokenizer.decoder = decoders.Sequence([
            decoders.ByteFallback(), decoders.Metaspace(replacement="\u2581",
                                                        prepend_scheme="first")])
    else:
        raise ValueError(f"decoder must be 'metaspace' or 'llama', got {decoder!r}")
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token=BOS, eos_token=EOS,
                                   pad_token=PAD, chat_template=CHAT_TEMPLATE,
                                   clean_up_tokenization_spaces=False)
    fast.save_pretrained(str(out_dir))
    return len(fast)
