"""Adapters for the other lossless BF16 compressors the bench compares with, run on the same
tensors: zipnn (byte grouping + Huffman, a C extension) and DFloat11 (Huffman-coded exponents).

Both are optional (the `test` extra installs them); a missing one raises CompetitorMissing.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import numpy as np
import torch

# DFloat11's own defaults (its GPU decoder's layout; they set the gap and position tables' size)
DFLOAT11_BYTES_PER_THREAD = 8
DFLOAT11_THREADS_PER_BLOCK = 512


class CompetitorMissing(RuntimeError):
    """A competitor's package is not installed (or cannot be imported here)."""


class ZipNNCodec:
    """zipnn on a tensor's raw bytes; `threads` bounds its worker threads (1 = per core)."""

    def __init__(self, threads: int):
        try:
            import zipnn
        except ImportError as exc:
            raise CompetitorMissing(f"zipnn is not installed ({exc}); pip install "
                                    "zipnn==0.5.4") from exc
        self.threads = threads
        self._zipnn = zipnn.ZipNN(input_format="byte", bytearray_dtype="bfloat16",
                                  threads=threads)

    def compress(self, raw: bytearray) -> bytes:
        """NOTE: zipnn 0.5.4 reorders the bits of its input buffer in place (even of a `bytes`
        object), so `raw` is clobbered: pass a private copy."""
        return self._zipnn.compress(raw)

    def decompress(self, blob: bytes) -> bytearray:
        return self._zipnn.decompress(blob)


@dataclass(frozen=True)
class DFloat11Size:
    nbytes: int  # for the whole tensor; scaled from the sample when sampled_numel < numel
    sampled_numel: int
    is_exact: bool  # the sample's Huffman stream decodes back to its exponents


class DFloat11Encoder:
    """DFloat11's encoder (pure Python, ~1-2 us per element) with a per-tensor Huffman codec.

    DFloat11 decodes on CUDA only, so the round trip is checked with the codec's own (pure
    Python) Huffman decoder and there is no decode speed to report.
    """

    def __init__(self):
        self._utils = _load_dfloat11_utils()

    def size(self, bits: np.ndarray, shape: tuple[int, ...], max_numel: int | None) -> DFloat11Size:
        """DFloat11's stored size as its own summary counts it: encoded exponents + sign and
        mantissa bytes + 4 bytes per output position + the packed gap bits."""
        sample = sample_rows(bits, shape, max_numel)
        weight = torch.from_numpy(sample.view(np.int16)).view(torch.bfloat16)
        with _quiet():
            _, counts = self._utils.get_codec(weight)
            codec, _, _ = self._utils.get_32bit_codec(counts)  # code lengths <= 32, as it ships
            encoded, other, positions, gaps, _ = self._utils.encode_weights(
                [weight], codec, DFLOAT11_BYTES_PER_THREAD, DFLOAT11_THREADS_PER_BLOCK)
        nbytes = encoded.numel() + other.numel() + positions.numel() * 4 + gaps.numel()
        scaled = round(nbytes * bits.size / sample.size)
        return DFloat11Size(scaled, sample.size, _huffman_round_trip(codec, encoded, other, sample))


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence DFloat11's prints, progress bars and its warning about a read-only array."""
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()), \
            warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        yield


def sample_rows(bits: np.ndarray, shape: tuple[int, ...], max_numel: int | None) -> np.ndarray:
    """`bits` itself, or evenly spaced whole rows of it holding at most `max_numel` elements."""
    if max_numel is None or bits.size <= max_numel:
        return bits
    cols = shape[-1]
    rows = bits.reshape(-1, cols)
    keep = np.linspace(0, rows.shape[0] - 1, max(1, max_numel // cols)).round().astype(np.int64)
    return np.ascontiguousarray(rows[np.unique(keep)]).reshape(-1)


def _huffman_round_trip(codec, encoded: torch.Tensor, other: torch.Tensor,
                        bits: np.ndarray) -> bool:
    symbols = codec.decode(encoded.numpy().tobytes())
    if len(symbols) < bits.size:
        return False
    exponents = np.asarray(symbols[:bits.size], dtype=np.uint16)
    sign_mantissa = other.numpy().astype(np.uint16)
    decoded = ((sign_mantissa & 0x80) << 8) | (exponents << 7) | (sign_mantissa & 0x7F)
    return bool(np.array_equal(decoded, bits))


def _load_dfloat11_utils() -> ModuleType:
    """dfloat11/dfloat11_utils.py alone: the package's __init__ imports cupy (CUDA only)."""
    spec = importlib.util.find_spec("dfloat11")
    if spec is None or not spec.submodule_search_locations:
        raise CompetitorMissing("dfloat11 is not installed; pip install dfloat11==0.5.0")
    path = Path(next(iter(spec.submodule_search_locations))) / "dfloat11_utils.py"
    utils_spec = importlib.util.spec_from_file_location("_ember_bench_dfloat11_utils", path)
    module = importlib.util.module_from_spec(utils_spec)
    try:
        utils_spec.loader.exec_module(module)
    except ImportError as exc:  # dahuffman
        raise CompetitorMissing(f"dfloat11's encoder cannot be imported: {exc}") from exc
    return module
