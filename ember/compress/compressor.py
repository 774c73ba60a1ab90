"""`ember compress MODEL_DIR OUT_DIR`: a model directory whose BF16 matrices are compressed
losslessly, usable as is by `ember serve --model OUT_DIR` and `LLM(OUT_DIR)`.

Every file but the weights is copied; each safetensors file is rewritten under the same name
(so an index's weight_map stays right) and checked bit for bit against the original at the end.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from ember.compress.codec import encode_bf16, entropy_bound_bytes
from ember.compress.format import (
    TensorEntry,
    WeightsFile,
    as_uint16,
    bits_checksum,
    encoded_tensors,
    file_metadata,
)
from ember.model.loader import find_weight_files

MIN_NUMEL = 1 << 16  # smaller tensors (norms, biases) would not repay their tables


@dataclass
class TensorReport:
    name: str
    original_bytes: int
    stored_bytes: int
    bound_bytes: int | None  # raw bytes + the exponents' entropy; None if not BF16/F32


@dataclass
class CompressReport:
    tensors: list[TensorReport] = field(default_factory=list)

    @property
    def original_bytes(self) -> int:
        return sum(t.original_bytes for t in self.tensors)

    @property
    def stored_bytes(self) -> int:
        return sum(t.stored_bytes for t in self.tensors)

    def summary(self) -> str:
        done = [t for t in self.tensors if t.stored_bytes < t.original_bytes]
        coded = [t for t in self.tensors if t.bound_bytes is not None]
        bound = sum(t.bound_bytes for t in coded) / max(1, sum(t.original_bytes for t in coded))
        return (f"{len(done)} of {len(self.tensors)} tensors compressed: "
                f"{self.original_bytes / 1e6:.1f} MB -> {self.stored_bytes / 1e6:.1f} MB "
                f"({1 - self.stored_bytes / max(1, self.original_bytes):.1%} smaller; the BF16/F32 "
                f"tensors' exponent-entropy bound is {1 - bound:.1%} smaller)")


def bf16_bits(tensor: torch.Tensor) -> np.ndarray:
    """The bits (flat uint16) of `tensor` rounded to BF16 (as torch's .to() rounds)."""
    return as_uint16(tensor.to(torch.bfloat16).contiguous())


def compress_model_dir(src: str | Path, dst: str | Path, min_numel: int = MIN_NUMEL,
                       threads: int | None = None, progress: bool = True) -> CompressReport:
    """Write the compressed copy of model directory `src` to `dst` (new or empty) and verify
    it; ValueError for an unusable source or destination."""
    src, dst = Path(src).expanduser(), Path(dst).expanduser()
    if not src.is_dir():
        raise ValueError(f"model directory {str(src)!r} does not exist or is not a directory")
    if dst.exists() and any(dst.iterdir()):
        raise ValueError(f"output directory {str(dst)!r} exists and is not empty")
    files = find_weight_files(src)
    for file in files:
        with WeightsFile(file) as f:
            if f.entries:
                raise ValueError(f"{file} is already compressed by ember compress")
    _copy_other_files(src, dst, set(files))
    report = CompressReport()
    total = sum(f.stat().st_size for f in files)
    with tqdm(total=total, unit="B", unit_scale=True, desc="Compressing",
              disable=not progress) as bar:
        for file in files:
            report.tensors += _compress_file(file, dst / file.relative_to(src), min_numel,
                                             threads, bar)
    for file in tqdm(files, desc="Verifying", disable=not progress):
        verify_file(file, dst / file.relative_to(src))
    return report


def _copy_other_files(src: Path, dst: Path, weights: set[Path]) -> None:
    for path in sorted(src.rglob("*")):
        if path.is_file() and path not in weights:
            target = dst / path.relative_to(src)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, target)


def _compress_file(src: Path, dst: Path, min_numel: int, threads: int | None,
                   bar: tqdm) -> list[TensorReport]:
    stored: dict[str, torch.Tensor] = {}
    entries: dict[str, TensorEntry] = {}
    reports = []
    with safe_open(str(src), framework="pt") as f:
        for name in f.keys():
            tensor = f.get_tensor(name)
            report, pieces, entry = compress_tensor(name, tensor, min_numel, threads)
            stored.update(pieces)
            if entry is not None:
                entries[name] = entry
            reports.append(report)
            bar.update(tensor.nbytes)
    dst.parent.mkdir(parents=True, exist_ok=True)
    save_file(stored, str(dst), metadata=file_metadata(entries))
    shutil.copymode(src, dst)
    return reports


def compress_tensor(name: str, tensor: torch.Tensor, min_numel: int = MIN_NUMEL,
                    threads: int | None = None
                    ) -> tuple[TensorReport, dict[str, torch.Tensor], TensorEntry | None]:
    """(report, tensors to store, metadata entry or None when stored as it was). BF16 and F32
    tensors have their exponent byte coded; an F32 tensor's low 16 bits are stored raw."""
    if tensor.dtype not in (torch.bfloat16, torch.float32):
        return TensorReport(name, tensor.nbytes, tensor.nbytes, None), {name: tensor}, None
    high, low = _halves(tensor)
    bound = int(np.ceil(entropy_bound_bytes(high))) + (low.nbytes if low is not None else 0)
    report = TensorReport(name, tensor.nbytes, tensor.nbytes, bound)
    if tensor.dim() < 2 or tensor.numel() < min_numel:
        return report, {name: tensor}, None
    enc = encode_bf16(high, threads)
    stored = enc.nbytes + (low.nbytes if low is not None else 0)
    if stored >= tensor.nbytes:
        return report, {name: tensor}, None
    report.stored_bytes = stored
    pieces = {k: torch.from_numpy(v) for k, v in encoded_tensors(name, enc, low).items()}
    dtype = "BF16" if low is None else "F32"
    return report, pieces, TensorEntry(list(tensor.shape), dtype, bits_checksum(
        as_uint16(tensor.contiguous())))


def _halves(tensor: torch.Tensor) -> tuple[np.ndarray, np.ndarray | None]:
    """(BF16-like bits, F32 low halves or None): an F32's high 16 bits are laid out as BF16."""
    if tensor.dtype == torch.bfloat16:
        return bf16_bits(tensor), None
    bits = tensor.contiguous().view(torch.int32).numpy().view(np.uint32).reshape(-1)
    return (bits >> 16).astype(np.uint16), (bits & 0xFFFF).astype(np.uint16)


def verify_file(original: Path, compressed: Path) -> None:
    """ValueError unless every tensor of `compressed` has the bits of `original`'s."""
    with safe_open(str(original), framework="pt") as want, WeightsFile(compressed) as got:
        if sorted(want.keys()) != got.keys():
            raise ValueError(f"{compressed} holds other tensors than {original}")
        for name in want.keys():
            expect = want.get_tensor(name)
            actual = got.get_tensor(name)
            if expect.dtype != actual.dtype or expect.shape != actual.shape or not torch.equal(
                    expect.reshape(-1).view(torch.uint8), actual.reshape(-1).view(torch.uint8)):
                raise ValueError(f"verification failed: {compressed}: tensor {name!r} differs "
                                 f"from {original}")
