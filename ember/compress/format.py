"""The on-disk format of a compressed model: safetensors files whose compressed tensors are
stored as their codec pieces (docs/compression.md).

A tensor `NAME` compressed is four tensors: `NAME::freq` (U16), `NAME::offsets` and
`NAME::states` (U32), and `NAME::payload` (U8: the words, then the sign/mantissa bytes, then a
zero byte if their number is odd), plus an entry in the file's `ember.compression` metadata
(JSON: format version, codec constants, per tensor its shape, dtype and xxh3-64 of its bits).
One payload holds a tensor's bulk so that it lies in one piece of the file, and safetensors
orders same-dtype tensors by name, so the loader reads the file front to back. Tensors that
were not worth compressing are stored as they were, under their own names.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import xxhash
from safetensors import safe_open

from ember.compress.codec import (
    GROUP_LANES,
    LANE_STEPS,
    PADDING_WORDS,
    PROB_BITS,
    CorruptStreamError,
    EncodedBF16,
    decode_bf16,
)

METADATA_KEY = "ember.compression"
FORMAT_VERSION = 1
CODEC = "bf16-exponent-rans"
SEPARATOR = "::"
PARTS = ("freq", "offsets", "states", "payload")
COMPRESSED_DTYPES = {"BF16": torch.bfloat16, "F32": torch.float32}
CODEC_CONSTANTS = {"prob_bits": PROB_BITS, "group_lanes": GROUP_LANES, "lane_steps": LANE_STEPS}


class CorruptWeightsError(ValueError):
    """A compressed weights file that is truncated, corrupt or of an unknown format."""


@dataclass(frozen=True)
class TensorEntry:
    shape: list[int]
    dtype: str  # safetensors dtype name of the original tensor ("BF16")
    xxh3: str  # hex xxh3-64 of the original tensor's bytes


def as_uint16(tensor: torch.Tensor) -> np.ndarray:
    """A flat uint16 numpy view of a contiguous CPU tensor's bytes (its storage, not a copy)."""
    return tensor.detach().view(torch.int16).numpy().view(np.uint16).reshape(-1)


def bits_checksum(bits: np.ndarray) -> str:
    return xxhash.xxh3_64_hexdigest(memoryview(np.ascontiguousarray(bits)).cast("B"))


def _read_ahead(path: Path) -> None:
    """Ask the kernel to start reading the whole file now, so disk reads overlap decoding
    (tensors are read through mmap page faults otherwise, one readahead window at a time)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return  # safe_open reports it
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
    except (AttributeError, OSError):
        pass  # not on this platform: plain demand paging
    finally:
        os.close(fd)


def encoded_tensors(name: str, enc: EncodedBF16,
                    low: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """The stored pieces of a compressed tensor; `low` holds an F32 tensor's low 16 bits (its
    high halves are what `enc` encodes, laid out like BF16)."""
    pad = np.zeros(enc.numel % 2, dtype=np.uint8)  # keeps the next payload's words aligned
    tail = [low.view(np.uint8)] if low is not None else []
    payload = np.concatenate([enc.words.view(np.uint8), enc.sign_mantissa, pad, *tail])
    return {f"{name}{SEPARATOR}freq": enc.freq, f"{name}{SEPARATOR}offsets": enc.offsets,
            f"{name}{SEPARATOR}states": enc.states, f"{name}{SEPARATOR}payload": payload}


def split_payload(payload: np.ndarray, offsets: np.ndarray, numel: int, has_low: bool = False
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """(words, sign_mantissa, low halves or None) views of a payload; CorruptStreamError if its
    size is wrong."""
    num_words = int(offsets[-1]) + PADDING_WORDS if offsets.size else 0
    low_at = 2 * num_words + numel + numel % 2
    expect = low_at + (2 * numel if has_low else 0)
    if payload.dtype != np.uint8 or payload.ndim != 1 or payload.size != expect:
        raise CorruptStreamError(f"payload has {payload.size} bytes, the lane offsets and "
                                 f"shape make it {expect}")
    words = _aligned(payload[: 2 * num_words]).view(np.uint16)
    low = _aligned(payload[low_at:]).view(np.uint16) if has_low else None
    return words, payload[2 * num_words: 2 * num_words + numel], low


def _aligned(part: np.ndarray) -> np.ndarray:
    return part.copy() if part.ctypes.data % 2 else part  # not from ember's writer: copy


def file_metadata(entries: dict[str, TensorEntry]) -> dict[str, str]:
    body = {"version": FORMAT_VERSION, "codec": CODEC, **CODEC_CONSTANTS,
            "tensors": {name: vars(e) for name, e in entries.items()}}
    return {"format": "pt", METADATA_KEY: json.dumps(body, sort_keys=True)}


class WeightsFile:
    """A safetensors weights file, compressed by ember or not, read tensor by tensor (use as a
    context manager); compressed tensors appear under their original names."""

    def __init__(self, path: Path):
        self.path = path
        _read_ahead(path)
        try:
            self._file = safe_open(str(path), framework="pt")
        except Exception as exc:  # SafetensorError, OSError
            raise CorruptWeightsError(f"{path} is not a readable safetensors file (truncated or "
                                      f"corrupt?): {exc}") from exc
        self.entries = self._read_entries(self._file.metadata() or {})
        stored = set(self._file.keys())
        self._raw = sorted(k for k in stored if SEPARATOR not in k)
        for name in self.entries:
            missing = [p for p in PARTS if f"{name}{SEPARATOR}{p}" not in stored]
            if missing:
                raise CorruptWeightsError(f"{path}: compressed tensor {name!r} lacks "
                                          f"{', '.join(missing)}")

    def __enter__(self) -> WeightsFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self._file = None

    def _read_entries(self, metadata: dict[str, str]) -> dict[str, TensorEntry]:
        if METADATA_KEY not in metadata:
            return {}
        try:
            body = json.loads(metadata[METADATA_KEY])
            header = {"version": body.get("version"), "codec": body.get("codec"),
                      **{key: body.get(key) for key in CODEC_CONSTANTS}}
            entries = {name: TensorEntry(list(e["shape"]), str(e["dtype"]), str(e["xxh3"]))
                       for name, e in body["tensors"].items()}
        except (KeyError, TypeError, AttributeError, json.JSONDecodeError) as exc:
            raise CorruptWeightsError(f"{self.path}: unreadable {METADATA_KEY} metadata: "
                                      f"{exc!r}") from exc
        expected = {"version": FORMAT_VERSION, "codec": CODEC, **CODEC_CONSTANTS}
        if header != expected:
            raise CorruptWeightsError(f"{self.path}: compression format {header} is not the "
                                      f"one this ember reads ({expected})")
        for name, entry in entries.items():
            if entry.dtype not in COMPRESSED_DTYPES:
                raise CorruptWeightsError(f"{self.path}: tensor {name!r} has compressed dtype "
                                          f"{entry.dtype!r}; this ember reads "
                                          f"{sorted(COMPRESSED_DTYPES)}")
        return entries

    def keys(self) -> list[str]:
        return sorted([*self._raw, *self.entries])

    def shape(self, name: str) -> list[int]:
        if name in self.entries:
            return self.entries[name].shape
        return list(self._file.get_slice(name).get_shape())

    def dtype(self, name: str) -> str:
        """The safetensors dtype name ("BF16", "F32", ...) of the (original) tensor."""
        if name in self.entries:
            return self.entries[name].dtype
        return self._file.get_slice(name).get_dtype()

    def encoded(self, name: str) -> tuple[EncodedBF16, np.ndarray | None]:
        """The codec pieces of compressed tensor `name` (views of the mapped file), and for an
        F32 tensor its low 16 bits."""
        numel = int(np.prod(self.entries[name].shape, dtype=np.int64))
        freq, offsets, states, payload = (self._part(name, p) for p in PARTS)
        try:
            words, sign_mantissa, low = split_payload(payload, offsets, numel,
                                                      self.entries[name].dtype == "F32")
        except CorruptStreamError as exc:
            raise CorruptWeightsError(f"{self.path}: tensor {name!r}: {exc}") from exc
        return EncodedBF16(numel, freq, offsets, states, words, sign_mantissa), low

    def _part(self, name: str, part: str) -> np.ndarray:
        try:
            return self._file.get_tensor(f"{name}{SEPARATOR}{part}").numpy()
        except Exception as exc:
            raise CorruptWeightsError(f"{self.path}: cannot read {name}{SEPARATOR}{part}: "
                                      f"{exc}") from exc

    def copy_into(self, name: str, dest: torch.Tensor, threads: int | None = None) -> None:
        """Write tensor `name` into `dest` (decoded in place, by `threads` threads, when dest
        is contiguous on the CPU in the tensor's own dtype; else through a temporary)."""
        if name not in self.entries:
            dest.copy_(self._file.get_tensor(name))
            return
        dtype = COMPRESSED_DTYPES[self.entries[name].dtype]
        direct = dest.dtype == dtype and dest.device.type == "cpu" and dest.is_contiguous()
        target = dest if direct else torch.empty(dest.shape, dtype=dtype)
        halves = as_uint16(target)
        enc, low = self.encoded(name)
        try:
            if low is None:
                decode_bf16(enc, out=halves, threads=threads)
            else:  # little-endian F32: the low half first, then the BF16-like high half
                halves[1::2] = decode_bf16(enc, threads=threads)
                halves[0::2] = low
        except CorruptStreamError as exc:
            raise CorruptWeightsError(f"{self.path}: tensor {name!r}: {exc}") from exc
        if bits_checksum(halves) != self.entries[name].xxh3:
            raise CorruptWeightsError(f"{self.path}: tensor {name!r} decodes to different "
                                      "bits than were compressed (checksum mismatch)")
        if not direct:
            dest.copy_(target)

    def get_tensor(self, name: str) -> torch.Tensor:
        if name not in self.entries:
            return self._file.get_tensor(name)
        entry = self.entries[name]
        out = torch.empty(entry.shape, dtype=COMPRESSED_DTYPES[entry.dtype])
        self.copy_into(name, out)
        return out
