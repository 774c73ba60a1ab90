"""Builds random-weight HF-format model directories with transformers' own classes (no network).

Used by the tests' tiny models and by `ember serve` with no --model (`demo_model_dir`); the
weights are random, so the text is gibberish, but every byte on disk is what transformers writes.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from ember.envs import cache_dir
from ember.model.demo_tokenizer import BOS, EOS, PAD, save_demo_tokenizer
from ember.model.registry import get_arch_spec

DEMO_MODEL_NAME = "demo-llama-10m-bf16-v2"  # bump the suffix whenever the recipe changes
DEMO_MODEL_RECIPE: dict[str, Any] = {
    "architecture": "LlamaForCausalLM", "vocab_size": 32000, "hidden_size": 256,
    "num_layers": 4, "num_heads": 4, "num_kv_heads": 2, "intermediate_size": 640,
    "dtype": "bfloat16", "tie_word_embeddings": True, "max_position_embeddings": 4096,
    "initializer_range": 0.05,
}
_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def _arch_defaults(architecture: str, hidden_size: int, num_heads: int,
                   intermediate_size: int) -> dict[str, Any]:
    """Small values for the knobs whose transformers defaults are large (MoE sizes, head_dim)."""
    spec = get_arch_spec(architecture)
    defaults: dict[str, Any] = {}
    if spec.qk_norm:  # Qwen3 configs default head_dim to 128
        defaults["head_dim"] = hidden_size // num_heads
    if spec.moe == "mixtral":
        defaults.update(num_local_experts=4, num_experts_per_tok=2)
    elif spec.moe == "qwen":
        defaults.update(num_experts=4, num_experts_per_tok=2,
                        moe_intermediate_size=intermediate_size // 2)
    if spec.shared_expert:
        defaults["shared_expert_intermediate_size"] = intermediate_size
    return defaults


_tokenizer_dirs: dict[int, tempfile.TemporaryDirectory] = {}  # vocab size -> trained once


def _save_tokenizer(out_dir: Path, vocab_size: int) -> dict[str, int]:
    """Copy the locally trained tokenizer in (training runs once per process and size)."""
    from tokenizers import Tokenizer

    if vocab_size not in _tokenizer_dirs:
        trained = tempfile.TemporaryDirectory(prefix="ember-tokenizer-")
        size = save_demo_tokenizer(trained.name, vocab_size)
        if size > vocab_size:
            raise ValueError(f"tokenizer has {size} tokens, more than vocab_size={vocab_size}")
        _tokenizer_dirs[vocab_size] = trained
    for file in Path(_tokenizer_dirs[vocab_size].name).iterdir():
        shutil.copy2(file, out_dir / file.name)
    tokenizer = Tokenizer.from_file(str(out_dir / "tokenizer.json"))
    return {"bos_token_id": tokenizer.token_to_id(BOS), "eos_token_id": tokenizer.token_to_id(EOS),
            "pad_token_id": tokenizer.token_to_id(PAD)}


def _randomize_norms_and_biases(model: torch.nn.Module, seed: int) -> None:
    """transformers initialises norms to 1 and biases to 0; random values make tests see them."""
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(".bias"):
                param.copy_(torch.randn(param.shape, generator=gen) * 0.1)
            elif "norm" in name:
                param.copy_(1.0 + torch.randn(param.shape, generator=gen) * 0.1)


def build_random_model(
    out_dir: str | Path,
    architecture: str = "LlamaForCausalLM",
    *,
    vocab_size: int = 1024,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 128,
    dtype: str = "float32",
    seed: int = 0,
    shard_size: int | str | None = None,
    init_device: str = "cpu",
    tokenizer_vocab_size: int | None = None,
    **config_overrides: Any,
) -> Path:
    """Write a random-weight `architecture` (config, safetensors, tokenizer, generation config).

    `config_overrides` go to transformers' config class as-is (e.g. rope_scaling, head_dim,
    tie_word_embeddings, sliding_window); `shard_size` (bytes or "100KB") shards the weights;
    `init_device` is where the random weights are drawn (a GPU makes billions of them quick);
    `tokenizer_vocab_size` trains a smaller tokenizer than the vocabulary (quicker to train).
    """
    import transformers

    get_arch_spec(architecture)  # unknown names raise, listing the supported ones
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    special_ids = _save_tokenizer(out, tokenizer_vocab_size or vocab_size)

    model_cls = getattr(transformers, architecture)
    kwargs: dict[str, Any] = {
        "vocab_size": vocab_size,
        "hidden_size": hidden_size,
        "num_hidden_layers": num_layers,
        "num_attention_heads": num_heads,
        "num_key_value_heads": num_kv_heads,
        "intermediate_size": intermediate_size,
        "max_position_embeddings": 2048,
        "tie_word_embeddings": False,
        **_arch_defaults(architecture, hidden_size, num_heads, intermediate_size),
        **special_ids,
        **config_overrides,
    }
    config = model_cls.config_class(**kwargs)
    torch.manual_seed(seed)
    with torch.device(init_device):
        model = model_cls(config)
    _randomize_norms_and_biases(model, seed)
    model = model.to(_DTYPES[dtype])
    model.generation_config = transformers.GenerationConfig(**special_ids)
    # transformers 5 always writes safetensors (no pickle); its save reverses the in-memory
    # fused MoE layout to the classic per-expert names (save_original_format=True).
    model.save_pretrained(out, max_shard_size=shard_size or "50GB")
    return out


def cached_model_dir(name: str, root: Path | None = None, **recipe: Any) -> Path:
    """`root/name` (default: the cache dir's models/), built by `build_random_model(**recipe)`
    on first use: atomically (built in a temp dir, then renamed), and reused afterwards."""
    root = root or cache_dir() / "models"
    final = root / name
    if (final / "config.json").is_file():
        return final
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=root))
    try:
        build_random_model(tmp, **recipe)
        tmp.chmod(0o755)  # mkdtemp makes it private; the cache is for every user of the machine
        os.rename(tmp, final)  # atomic; fails if another process finished first
    except OSError:
        if not (final / "config.json").is_file():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def demo_model_dir() -> Path:
    """The default model of `ember serve`: a ~10M-parameter Llama (bf16, 32k vocab)."""
    return cached_model_dir(DEMO_MODEL_NAME, **DEMO_MODEL_RECIPE)
