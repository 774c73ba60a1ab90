"""The benchmark's models: bf16 Llama-shaped random models of ~10M and ~250M parameters.

Built once with `ember.model.demo.build_random_model` (32k-vocab tokenizer trained locally)
into the ember cache dir, then reused; parameter counts come from the config alone.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

# Shapes; "10m" ties its embedding to the LM head (as the demo model does) to land near 10M.
MODEL_SIZES: dict[str, dict[str, Any]] = {
    "10m": dict(vocab_size=32000, hidden_size=256, num_layers=4, num_heads=8, num_kv_heads=4,
                intermediate_size=768, tie_word_embeddings=True),
    "250m": dict(vocab_size=32000, hidden_size=1024, num_layers=16, num_heads=16, num_kv_heads=8,
                 intermediate_size=2816, tie_word_embeddings=False),
}
_VERSION = "v1"  # bump when a shape changes, so a stale cached model is not reused


def bench_model_name(size: str) -> str:
    return f"bench-llama-{size}-bf16-{_VERSION}"


def build_bench_model(size: str, root: Path | None = None) -> Path:
    """The model directory for `size` (built on first use, atomically, then cached)."""
    if size not in MODEL_SIZES:
        raise ValueError(f"unknown model size {size!r}; known: {list(MODEL_SIZES)}")
    from ember.model.demo import cached_model_dir

    return cached_model_dir(bench_model_name(size), root, architecture="LlamaForCausalLM",
                            dtype="bfloat16", max_position_embeddings=4096, **MODEL_SIZES[size])


def count_parameters(config: dict[str, Any]) -> dict[str, int]:
    """Parameters of a Llama config.json, each stored tensor once (a tied LM head is not
    counted again): `total`, `embedding` (input table), `lm_head` (0 when tied), `layers`."""
    hidden, inter = config["hidden_size"], config["intermediate_size"]
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    head_dim = config.get("head_dim") or hidden // heads
    attn = hidden * heads * head_dim * 2 + hidden * kv_heads * head_dim * 2  # q, o, k, v
    mlp = 3 * hidden * inter  # gate, up, down
    per_layer = attn + mlp + 2 * hidden  # + two RMSNorm weights
    layers = config["num_hidden_layers"] * per_layer
    embedding = config["vocab_size"] * hidden
    lm_head = 0 if config.get("tie_word_embeddings") else embedding
    total = embedding + lm_head + layers + hidden  # + final norm
    return {"total": total, "embedding": embedding, "lm_head": lm_head, "layers": layers}
