"""Checkpoint tensor names -> slices of the decoder's (fused) parameters.

Canonical names are transformers' classic on-disk layout (q_proj/k_proj/v_proj, per-expert
gate_proj/up_proj/down_proj); Mixtral's w1/w3/w2 + block_sparse_moe and transformers 5's fused
`experts.gate_up_proj`/`experts.down_proj` are accepted as aliases. Knows nothing about files.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ember.model.registry import DecoderConfig

_MIXTRAL_EXPERT = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}
_MIXTRAL_EXPERT_RE = re.compile(r"\.experts\.(\d+)\.(w1|w2|w3)\.")


@dataclass(frozen=True)
class Target:
    param: str  # decoder parameter name
    index: tuple  # selector into that parameter: () whole, (rows,) or (expert, rows)
    pieces: tuple[str, ...]  # canonical names this tensor provides (several for a fused one)


def normalize_name(name: str) -> str:
    """Map the accepted aliases onto canonical names (Mixtral's naming -> Qwen-MoE's)."""
    name = name.replace(".block_sparse_moe.", ".mlp.")
    return _MIXTRAL_EXPERT_RE.sub(lambda m: f".experts.{m[1]}.{_MIXTRAL_EXPERT[m[2]]}.", name)


def _rows(start: int, size: int) -> slice:
    return slice(start, start + size)


def checkpoint_targets(cfg: DecoderConfig) -> dict[str, Target]:
    """Every accepted (normalised) checkpoint name of this model and where it goes."""
    targets: dict[str, Target] = {}

    def add(name: str, param: str, index: tuple = (), pieces: tuple[str, ...] = ()) -> None:
        targets[name] = Target(param, index, pieces or (name,))

    add("model.embed_tokens.weight", "embed_tokens.weight")
    add("model.norm.weight", "norm.weight")
    if not cfg.tie_word_embeddings:
        add("lm_head.weight", "lm_head.weight")
    for i in range(cfg.num_layers):
        src, dst = f"model.layers.{i}.", f"layers.{i}."
        add(src + "input_layernorm.weight", dst + "input_layernorm.weight")
        add(src + "post_attention_layernorm.weight", dst + "post_attention_layernorm.weight")
        _attention(add, cfg, src + "self_attn.", dst + "self_attn.")
        if cfg.moe is not None and cfg.moe_layers[i]:
            _moe(add, targets, cfg, src + "mlp.", dst + "mlp.")
        else:
            _dense_mlp(add, cfg.intermediate_size, cfg.mlp_bias, src + "mlp.", dst + "mlp.")
    return targets


def _attention(add, cfg: DecoderConfig, src: str, dst: str) -> None:
    """q/k/v -> rows [q | k | v] of qkv_proj (weight and, if any, bias)."""
    kinds = ["weight"] + (["bias"] if cfg.qkv_bias else [])
    for kind in kinds:
        add(f"{src}q_proj.{kind}", f"{dst}qkv_proj.{kind}", (_rows(0, cfg.q_size),))
        add(f"{src}k_proj.{kind}", f"{dst}qkv_proj.{kind}", (_rows(cfg.q_size, cfg.kv_size),))
        add(f"{src}v_proj.{kind}", f"{dst}qkv_proj.{kind}",
            (_rows(cfg.q_size + cfg.kv_size, cfg.kv_size),))
    add(f"{src}o_proj.weight", f"{dst}o_proj.weight")
    if cfg.o_bias:
        add(f"{src}o_proj.bias", f"{dst}o_proj.bias")
    if cfg.qk_norm:
        add(f"{src}q_norm.weight", f"{dst}q_norm.weight")
        add(f"{src}k_norm.weight", f"{dst}k_norm.weight")


def _dense_mlp(add, inter: int, bias: bool, src: str, dst: str) -> None:
    """gate/up -> rows [gate | up] of gate_up_proj."""
    for kind in ["weight"] + (["bias"] if bias else []):
        add(f"{src}gate_proj.{kind}", f"{dst}gate_up_proj.{kind}", (_rows(0, inter),))
        add(f"{src}up_proj.{kind}", f"{dst}gate_up_proj.{kind}", (_rows(inter, inter),))
        add(f"{src}down_proj.{kind}", f"{dst}down_proj.{kind}")


def _moe(add, targets: dict[str, Target], cfg: DecoderConfig, src: str, dst: str) -> None:
    """Router (+ shared_expert_gate as its last row), experts stacked into [E, ...] tensors."""
    moe = cfg.moe
    inter = moe.intermediate_size
    add(f"{src}gate.weight", f"{dst}gate.weight", (_rows(0, moe.num_experts),))
    gate_up_pieces, down_pieces = [], []
    for e in range(moe.num_experts):
        expert = f"{src}experts.{e}."
        add(expert + "gate_proj.weight", f"{dst}experts_gate_up", (e, _rows(0, inter)))
        add(expert + "up_proj.weight", f"{dst}experts_gate_up", (e, _rows(inter, inter)))
        add(expert + "down_proj.weight", f"{dst}experts_down", (e,))
        gate_up_pieces += [expert + "gate_proj.weight", expert + "up_proj.weight"]
        down_pieces.append(expert + "down_proj.weight")
    # transformers 5 with save_original_format=False writes the stacked tensors as-is.
    targets[f"{src}experts.gate_up_proj"] = Target(f"{dst}experts_gate_up", (),
                                                   tuple(gate_up_pieces))
    targets[f"{src}experts.down_proj"] = Target(f"{dst}experts_down", (), tuple(down_pieces))
    if moe.shared_expert_intermediate_size:
        _dense_mlp(add, moe.shared_expert_intermediate_size, False, f"{src}shared_expert.",
                   f"{dst}shared_expert.")
        add(f"{src}shared_expert_gate.weight", f"{dst}gate.weight",
            (_rows(moe.num_experts, 1),))
