"""Maps a Hugging Face `architectures` name to the traits ember's shared decoder needs.

Resolves a transformers config into a frozen `DecoderConfig`; builds no modules, reads no weights.
Anything the decoder cannot reproduce exactly is rejected here with an error naming the field.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS


@dataclass(frozen=True)
class ArchSpec:
    """What distinguishes one architecture; a str names the config attribute holding the flag."""

    model_type: str
    qkv_bias: str | bool = False
    o_bias: str | bool = False
    mlp_bias: str | bool = False
    qk_norm: bool = False  # RMSNorm over head_dim on q and k before rope (Qwen3)
    # "none": no sliding window; "global": config.sliding_window on every layer;
    # "layer_types": only on layers whose config.layer_types entry is "sliding_attention".
    sliding: Literal["none", "global", "layer_types"] = "none"
    moe: Literal["mixtral", "qwen"] | None = None
    shared_expert: bool = False


ARCHITECTURES: dict[str, ArchSpec] = {
    "LlamaForCausalLM": ArchSpec(
        "llama", qkv_bias="attention_bias", o_bias="attention_bias", mlp_bias="mlp_bias"
    ),
    "MistralForCausalLM": ArchSpec("mistral", sliding="global"),
    "Qwen2ForCausalLM": ArchSpec("qwen2", qkv_bias=True, sliding="layer_types"),
    "Qwen3ForCausalLM": ArchSpec(
        "qwen3", qkv_bias="attention_bias", o_bias="attention_bias", qk_norm=True,
        sliding="layer_types",
    ),
    "MixtralForCausalLM": ArchSpec("mixtral", sliding="global", moe="mixtral"),
    "Qwen2MoeForCausalLM": ArchSpec(
        "qwen2_moe", qkv_bias="qkv_bias", sliding="layer_types", moe="qwen", shared_expert=True
    ),
    "Qwen3MoeForCausalLM": ArchSpec(
        "qwen3_moe", qkv_bias="attention_bias", o_bias="attention_bias", qk_norm=True,
        sliding="global", moe="qwen",
    ),
}

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "yarn")


@dataclass(frozen=True)
class RopeConfig:
    inv_freq: tuple[float, ...]  # [head_dim // 2] exactly transformers' float32 values
    attention_scaling: float = 1.0  # multiplies cos/sin (yarn); 1.0 otherwise


@dataclass(frozen=True)
class MoEConfig:
    num_experts: int
    top_k: int
    intermediate_size: int  # per expert
    renormalize: bool  # divide the top-k probabilities by their sum
    # Mixtral scales expert outputs by float32 weights; Qwen casts the weights to the model dtype.
    fp32_routing_weights: bool
    shared_expert_intermediate_size: int = 0  # 0: no shared expert


@dataclass(frozen=True)
class DecoderConfig:
    """Everything the shared decoder builds from, resolved once from the HF config."""

    architecture: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int  # dense MLP (all layers of dense archs, non-MoE layers of MoE archs)
    rms_norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    qk_norm: bool
    rope: RopeConfig
    sliding_windows: tuple[int | None, ...]  # [num_layers]
    moe: MoEConfig | None = None
    moe_layers: tuple[bool, ...] = ()  # [num_layers] True where the MLP is the sparse MoE block

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim


def get_arch_spec(architecture: str) -> ArchSpec:
    if architecture not in ARCHITECTURES:
        raise ValueError(
            f"unsupported architecture {architecture!r} (config.json 'architectures'); "
            f"ember supports: {', '.join(sorted(ARCHITECTURES))}"
        )
    return ARCHITECTURES[architecture]


def pick_architecture(architectures: list[str] | None) -> str:
    """The first supported name in config.json's `architectures` list."""
    if not architectures:
        raise ValueError("config.json has no 'architectures' field naming the model class")
    for name in architectures:
        if name in ARCHITECTURES:
            return name
    raise ValueError(
        f"unsupported architecture {', '.join(map(repr, architectures))} (config.json "
        f"'architectures'); ember supports: {', '.join(sorted(ARCHITECTURES))}"
    )


def _flag(config: Any, value: str | bool) -> bool:
    return bool(getattr(config, value, False)) if isinstance(value, str) else value


def resolve_rope(config: Any, head_dim: int) -> RopeConfig:
    """inv_freq from transformers' own ROPE_INIT_FUNCTIONS so scaled variants match exactly."""
    params = getattr(config, "rope_parameters", None) or {}
    if "rope_type" not in params and any(isinstance(v, dict) for v in params.values()):
        raise ValueError("config.json 'rope_parameters' nested per layer type is not supported")
    rope_type = params.get("rope_type", "default")
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ValueError(
            f"config.json rope_parameters/rope_scaling type {rope_type!r} is not supported "
            f"(supported: {', '.join(SUPPORTED_ROPE_TYPES)})"
        )
    if params.get("partial_rotary_factor", 1.0) != 1.0:
        raise ValueError("config.json 'partial_rotary_factor' != 1.0 is not supported")
    if rope_type == "default":
        base = params.get("rope_theta", getattr(config, "rope_theta", 10000.0))
        exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
        inv_freq, scaling = 1.0 / (base ** exponents), 1.0
    else:
        inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](config)
    if inv_freq.numel() != head_dim // 2:
        raise ValueError(f"rope inv_freq has {inv_freq.numel()} entries, head_dim is {head_dim}")
    return RopeConfig(tuple(inv_freq.float().tolist()), float(scaling))


def _sliding_windows(config: Any, spec: ArchSpec, num_layers: int) -> tuple[int | None, ...]:
    window = getattr(config, "sliding_window", None) or None  # Qwen2-MoE stores 0 for "off"
    if spec.sliding == "none":
        return (None,) * num_layers
    if spec.sliding == "global":
        return (window,) * num_layers
    layer_types = getattr(config, "layer_types", None) or ["full_attention"] * num_layers
    if len(layer_types) != num_layers:
        raise ValueError(f"config.json 'layer_types' has {len(layer_types)} entries, "
                         f"num_hidden_layers is {num_layers}")
    windows = tuple(window if t == "sliding_attention" else None for t in layer_types)
    if any(t == "sliding_attention" for t in layer_types) and window is None:
        raise ValueError("config.json 'layer_types' has sliding layers but no 'sliding_window'")
    return windows


def _resolve_moe(config: Any, spec: ArchSpec, num_layers: int) -> tuple[MoEConfig, tuple]:
    if spec.moe == "mixtral":
        moe = MoEConfig(config.num_local_experts, config.num_experts_per_tok,
                        config.intermediate_size, renormalize=True, fp32_routing_weights=True)
        return moe, (True,) * num_layers
    shared = config.shared_expert_intermediate_size if spec.shared_expert else 0
    moe = MoEConfig(config.num_experts, config.num_experts_per_tok, config.moe_intermediate_size,
                    renormalize=bool(config.norm_topk_prob), fp32_routing_weights=False,
                    shared_expert_intermediate_size=shared)
    mlp_only = set(getattr(config, "mlp_only_layers", None) or [])
    step = config.decoder_sparse_step
    layers = tuple(i not in mlp_only and moe.num_experts > 0 and (i + 1) % step == 0
                   for i in range(num_layers))
    return moe, layers


def resolve_config(config: Any, architecture: str) -> DecoderConfig:
    """Turn a transformers `PretrainedConfig` into the decoder's frozen settings."""
    spec = get_arch_spec(architecture)
    if config.model_type != spec.model_type:
        raise ValueError(f"config.json 'model_type' is {config.model_type!r} but "
                         f"{architecture} needs {spec.model_type!r}")
    if getattr(config, "hidden_act", "silu") != "silu":
        raise ValueError(f"config.json 'hidden_act' {config.hidden_act!r} is not supported "
                         "(only 'silu')")
    num_layers = config.num_hidden_layers
    num_heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // num_heads
    num_kv_heads = getattr(config, "num_key_value_heads", None) or num_heads
    if num_heads % num_kv_heads:
        raise ValueError(f"num_attention_heads ({num_heads}) must be a multiple of "
                         f"num_key_value_heads ({num_kv_heads})")
    moe, moe_layers = (None, (False,) * num_layers)
    if spec.moe is not None:
        moe, moe_layers = _resolve_moe(config, spec, num_layers)
    return DecoderConfig(
        architecture=architecture,
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        intermediate_size=config.intermediate_size,
        rms_norm_eps=config.rms_norm_eps,
        max_position_embeddings=config.max_position_embeddings,
        tie_word_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
        qkv_bias=_flag(config, spec.qkv_bias),
        o_bias=_flag(config, spec.o_bias),
        mlp_bias=_flag(config, spec.mlp_bias),
        qk_norm=spec.qk_norm,
        rope=resolve_rope(config, head_dim),
        sliding_windows=_sliding_windows(config, spec, num_layers),
        moe=moe,
        moe_layers=moe_layers,
    )
