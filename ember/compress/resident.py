"""Keep the decoder layers' weights compressed in memory: each layer's matrices are decoded
into one shared set of buffers just before the layer runs (a forward pre-hook), so the model
holds its compressed bytes plus one decoded layer. On a GPU the Triton decoder does it (inside
CUDA graphs too), on a CPU the C decoder.

A parameter is kept compressed only when every checkpoint tensor that fills it was stored
compressed; the rest stay ordinary parameters.
"""

from __future__ import annotations

import logging
import re
from collections import defaultdict
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ember.compress.codec import EncodedBF16, decode_bf16
from ember.compress.format import WeightsFile, as_uint16
from ember.model.decoder import DecoderModel
from ember.model.weights import checkpoint_targets, normalize_name

logger = logging.getLogger(__name__)
_LAYER_PARAM = re.compile(r"^layers\.(\d+)\.(.+)$")


@dataclass
class Piece:
    encoded: Any  # EncodedBF16 (CPU) or triton_decode.DeviceEncoded
    index: tuple  # selector into the parameter (a fused slice)


@dataclass
class ResidentWeights:
    """What `make_resident` set up; `compressed_bytes` stay in memory in place of
    `decoded_bytes` (those of all layers), plus `scratch_bytes` for one decoded layer."""

    compressed_bytes: int = 0
    decoded_bytes: int = 0
    scratch_bytes: int = 0
    num_params: int = 0
    hooks: list = field(default_factory=list)

    @property
    def saved_bytes(self) -> int:
        return self.decoded_bytes - self.compressed_bytes - self.scratch_bytes


def make_resident(model: DecoderModel, files: list[Path]) -> ResidentWeights:
    """Swap every fully compressed layer parameter of `model` (already loaded) for a shared
    buffer refilled per layer; ValueError if the files hold no compressed layer weights."""
    if model.dtype != torch.bfloat16:
        raise ValueError(f"keep_weights_compressed needs dtype bfloat16 (the compressed "
                         f"weights' own), not {model.dtype}")
    device = next(model.parameters()).device
    pieces = _collect_pieces(model, files, device)
    if not pieces:
        raise ValueError("keep_weights_compressed needs a model written by `ember compress` "
                         f"(no compressed layer weights in {files[0].parent})")
    params = dict(model.named_parameters())
    scratch: dict[str, torch.Tensor] = {}
    by_layer: dict[int, list[tuple[torch.Tensor, list[Piece]]]] = defaultdict(list)
    resident = ResidentWeights()
    for name, parts in pieces.items():
        layer, local = _LAYER_PARAM.match(name).groups()
        old = params[name]
        key = f"{local}:{tuple(old.shape)}"
        if key not in scratch:
            scratch[key] = torch.empty_like(old)
            resident.scratch_bytes += old.nbytes
        _set_param(model, name, scratch[key])
        by_layer[int(layer)].append((scratch[key], parts))
        resident.decoded_bytes += old.nbytes
        resident.compressed_bytes += sum(p.encoded.nbytes for p in parts)
        resident.num_params += 1
    decode = _decoder(device)
    for idx, entries in by_layer.items():
        resident.hooks.append(model.layers[idx].register_forward_pre_hook(
            _refill(entries, decode)))
    if device.type == "cuda":
        torch.cuda.empty_cache()  # hand the decoded layers' memory back for the KV cache
    logger.info("weights kept compressed: %d layer parameters, %.1f MiB in memory instead of "
                "%.1f MiB (+ %.1f MiB for one decoded layer)", resident.num_params,
                resident.compressed_bytes / 2**20, resident.decoded_bytes / 2**20,
                resident.scratch_bytes / 2**20)
    return resident


def _collect_pieces(model: DecoderModel, files: list[Path],
                    device: torch.device) -> dict[str, list[Piece]]:
    """Decoder parameter name -> its compressed pieces, for layer parameters whose every
    checkpoint tensor is compressed."""
    targets = checkpoint_targets(model.config)
    found: dict[str, list[Piece]] = defaultdict(list)
    raw_params: set[str] = set()
    to_device = _uploader(device)
    for file in files:
        with WeightsFile(file) as f:
            for name in f.keys():
                target = targets.get(normalize_name(name))
                if target is None or not _LAYER_PARAM.match(target.param):
                    continue
                if name in f.entries and f.entries[name].dtype == "BF16":
                    encoded, _ = f.encoded(name)
                    found[target.param].append(Piece(to_device(encoded), target.index))
                else:
                    raw_params.add(target.param)
    return {name: parts for name, parts in found.items() if name not in raw_params}


def _uploader(device: torch.device):
    if device.type == "cuda":
        from ember.compress.triton_decode import to_device

        return lambda enc: to_device(enc, device)
    return _own_copy


def _own_copy(enc: EncodedBF16) -> EncodedBF16:
    """A copy in ordinary memory (the file's mapping goes when the file is closed)."""
    return replace(enc, **{f.name: np.array(getattr(enc, f.name))
                           for f in fields(enc) if f.name != "numel"})


def _decoder(device: torch.device):
    if device.type == "cuda":
        from ember.compress.triton_decode import decode_bf16_triton

        return lambda enc, out: decode_bf16_triton(enc, out, check=False)

    def decode_cpu(enc: EncodedBF16, out: torch.Tensor) -> None:
        decode_bf16(enc, out=as_uint16(out), threads=torch.get_num_threads())

    return decode_cpu


def _refill(entries: list[tuple[torch.Tensor, list[Piece]]], decode):
    def hook(module: nn.Module, args: tuple) -> None:
        for buffer, parts in entries:
            for part in parts:
                decode(part.encoded, buffer[part.index])

    return hook


def _set_param(model: nn.Module, name: str, tensor: torch.Tensor) -> None:
    owner_name, _, attr = name.rpartition(".")
    owner = model.get_submodule(owner_name)
    setattr(owner, attr, nn.Parameter(tensor, requires_grad=False))
    if hasattr(owner, "resident_weight"):
        owner.resident_weight = True
