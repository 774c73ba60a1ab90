"""Keep the decoder layers' weights compressed in memory: each layer's matrices are decoded
into one shared set of buffers just before the layer runs (a forward pre-hook), so the model
holds its compressed bytes plus one decoded layer. On a GPU the Triton decoder does it (inside
CUDA graphs too), on a CPU the C decoder.

A parameter is kept compressed only when every checkpoint tensor that fills it was stored
compressed; the rest stay ordinary parameters. The loader never decodes the kept ones.
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
from torch.overrides import TorchFunctionMode

from ember.compress.codec import EncodedBF16, decode_bf16
from ember.compress.format import WeightsFile, as_uint16
from ember.model.decoder import DecoderModel
from ember.model.registry import DecoderConfig
from ember.model.weights import checkpoint_targets, normalize_name

logger = logging.getLogger(__name__)
_LAYER_PARAM = re.compile(r"^layers\.(\d+)\.(.+)$")


@dataclass
class Piece:
    encoded: Any  # EncodedBF16 (CPU) or triton_decode.DeviceEncoded
    index: tuple  # selector into the parameter (a fused slice)


@dataclass
class ResidentWeights:
    """What was set up; `compressed_bytes` stay in memory in place of `decoded_bytes` (those of
    all layers), plus `scratch_bytes` for one decoded layer."""

    compressed_bytes: int = 0
    decoded_bytes: int = 0
    scratch_bytes: int = 0
    param_names: set[str] = field(default_factory=set)  # the decoder parameters kept compressed
    hooks: list = field(default_factory=list)

    @property
    def num_params(self) -> int:
        return len(self.param_names)

    @property
    def saved_bytes(self) -> int:
        return self.decoded_bytes - self.compressed_bytes - self.scratch_bytes


def new_resident_model(cfg: DecoderConfig, dtype: torch.dtype, device: torch.device | str,
                       files: list[Path]) -> tuple[DecoderModel, ResidentWeights]:
    """An unfilled decoder whose fully compressed layer parameters are already the shared
    buffers, refilled per layer, and never get storage of their own; the loader fills the
    others and must skip `param_names`. ValueError as `make_resident`."""
    _check_dtype(dtype)
    device = torch.device(device)
    pieces = _pieces_or_error(cfg, files, device)
    with _EmptyOnMeta():
        model = DecoderModel(cfg, dtype, device)
    resident = _install(model, pieces, device)
    _allocate_meta_params(model, device)
    return model, resident


def make_resident(model: DecoderModel, files: list[Path]) -> ResidentWeights:
    """Swap every fully compressed layer parameter of `model`, already loaded (every weight
    decoded once; the bench measures that model), for a shared buffer refilled per layer;
    ValueError if the files hold no compressed layer weights."""
    _check_dtype(model.dtype)
    device = next(model.parameters()).device
    resident = _install(model, _pieces_or_error(model.config, files, device), device)
    if device.type == "cuda":
        torch.cuda.empty_cache()  # hand the decoded layers' memory back for the KV cache
    return resident


def _check_dtype(dtype: torch.dtype) -> None:
    if dtype != torch.bfloat16:
        raise ValueError(f"keep_weights_compressed needs dtype bfloat16 (the compressed "
                         f"weights' own), not {dtype}")


def _pieces_or_error(cfg: DecoderConfig, files: list[Path],
                     device: torch.device) -> dict[str, list[Piece]]:
    pieces = _collect_pieces(cfg, files, device)
    if not pieces:
        raise ValueError("keep_weights_compressed needs a model written by `ember compress` "
                         f"(no compressed layer weights in {files[0].parent})")
    return pieces


def _install(model: DecoderModel, pieces: dict[str, list[Piece]],
             device: torch.device) -> ResidentWeights:
    """Point each parameter in `pieces` (loaded or on meta) at the buffer its layer-local name
    shares across layers, and hook every layer to refill its buffers before it runs."""
    params = dict(model.named_parameters())
    scratch: dict[str, torch.Tensor] = {}
    by_layer: dict[int, list[tuple[torch.Tensor, list[Piece]]]] = defaultdict(list)
    resident = ResidentWeights()
    for name, parts in pieces.items():
        layer, local = _LAYER_PARAM.match(name).groups()
        old = params[name]
        key = f"{local}:{tuple(old.shape)}"
        if key not in scratch:
            scratch[key] = torch.empty(old.shape, dtype=old.dtype, device=device)
            resident.scratch_bytes += old.nbytes
        _set_param(model, name, scratch[key])
        by_layer[int(layer)].append((scratch[key], parts))
        resident.decoded_bytes += old.nbytes
        resident.compressed_bytes += sum(p.encoded.nbytes for p in parts)
        resident.param_names.add(name)
    decode = _decoder(device)
    most = max(sum(len(parts) for _, parts in entries) for entries in by_layer.values())
    streams = ([torch.cuda.Stream(device) for _ in range(most)] if device.type == "cuda"
               else None)
    for idx, entries in by_layer.items():
        resident.hooks.append(model.layers[idx].register_forward_pre_hook(
            _refill(entries, decode, streams)))
    logger.info("weights kept compressed: %d layer parameters, %.1f MiB in memory instead of "
                "%.1f MiB (+ %.1f MiB for one decoded layer)", resident.num_params,
                resident.compressed_bytes / 2**20, resident.decoded_bytes / 2**20,
                resident.scratch_bytes / 2**20)
    return resident


class _EmptyOnMeta(TorchFunctionMode):
    """Inside, `torch.empty` makes meta tensors: a decoder built here has no parameter storage
    (layers.empty_parameter allocates with it), while its buffers, made by other factories,
    keep their values on the real device."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.empty:
            kwargs = {**kwargs, "device": "meta"}
        return func(*args, **kwargs)


def _allocate_meta_params(model: nn.Module, device: torch.device) -> None:
    """Uninitialised storage on `device` for every parameter still on meta (a tied one stays
    one parameter); RuntimeError for a buffer left on meta (its values were never computed)."""
    allocated: dict[int, nn.Parameter] = {}
    for module in model.modules():
        for attr, param in list(module._parameters.items()):
            if param is None or not param.is_meta:
                continue
            if id(param) not in allocated:
                allocated[id(param)] = nn.Parameter(torch.empty_like(param, device=device),
                                                    requires_grad=False)
            setattr(module, attr, allocated[id(param)])
    lost = [name for name, buffer in model.named_buffers() if buffer.is_meta]
    if lost:
        raise RuntimeError(f"buffer {lost[0]!r} was made by torch.empty while the decoder was "
                           "built on meta; give it its values with another factory")


def _collect_pieces(cfg: DecoderConfig, files: list[Path],
                    device: torch.device) -> dict[str, list[Piece]]:
    """Decoder parameter name -> its compressed pieces (not decoded), for layer parameters
    whose every checkpoint tensor is compressed."""
    targets = checkpoint_targets(cfg)
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


def _refill(entries: list[tuple[torch.Tensor, list[Piece]]], decode,
            streams: list[torch.cuda.Stream] | None = None):
    """The layer's pre-hook: decode each piece into its slice of the shared buffers. On a GPU
    each piece gets its own stream, forked from and joined back to the current one (which a
    CUDA graph captures as parallel branches)."""
    jobs = [(part.encoded, buffer[part.index]) for buffer, parts in entries for part in parts]

    def hook(module: nn.Module, args: tuple) -> None:
        for encoded, out in jobs:
            decode(encoded, out)

    def hook_on_streams(module: nn.Module, args: tuple) -> None:
        # NOTE: one piece's decode is a chain of 2048 dependent steps over few warps (latency
        # bound); run one after another, a layer's pieces took ~7x one piece's time.
        main = torch.cuda.current_stream()
        for stream, (encoded, out) in zip(streams, jobs):
            stream.wait_stream(main)  # the previous layer has finished reading the buffers
            with torch.cuda.stream(stream):
                decode(encoded, out)
        for stream in streams[:len(jobs)]:
            main.wait_stream(stream)

    return hook if streams is None else hook_on_streams


def _set_param(model: nn.Module, name: str, tensor: torch.Tensor) -> None:
    owner_name, _, attr = name.rpartition(".")
    owner = model.get_submodule(owner_name)
    setattr(owner, attr, nn.Parameter(tensor, requires_grad=False))
    if hasattr(owner, "resident_weight"):
        owner.resident_weight = True
