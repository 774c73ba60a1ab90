"""Per-tensor sizes: the BF16 original, the exponent-entropy bound, ember's codec, zipnn and
DFloat11, each compressor's round trip checked bit for bit.

Sizes only; speed.py times the codecs.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

from ember.bench.compress.competitors import DFloat11Encoder, ZipNNCodec
from ember.bench.compress.tensors import BenchTensor
from ember.compress.codec import decode_bf16, encode_bf16, entropy_bound_bytes

CODECS = ("ember", "zipnn", "dfloat11")


@dataclass
class TensorSizes:
    name: str
    shape: list[int]
    source_dtype: str
    original_bytes: int
    bound_bytes: float  # numel (sign + mantissa) + numel * H(exponent) / 8
    sizes: dict[str, int] = field(default_factory=dict)  # codec -> bytes
    is_exact: dict[str, bool] = field(default_factory=dict)  # codec -> bit-exact round trip
    dfloat11_sampled_numel: int | None = None  # set when DFloat11 saw only some rows

    def to_json(self) -> dict:
        return asdict(self)


def measure_tensor(tensor: BenchTensor, zipnn: ZipNNCodec | None,
                   dfloat11: DFloat11Encoder | None,
                   dfloat11_max_numel: int | None) -> TensorSizes:
    row = TensorSizes(tensor.name, list(tensor.shape), tensor.source_dtype, tensor.nbytes,
                      entropy_bound_bytes(tensor.bits))
    encoded = encode_bf16(tensor.bits)
    row.sizes["ember"] = encoded.nbytes
    row.is_exact["ember"] = bool(np.array_equal(decode_bf16(encoded), tensor.bits))
    if zipnn is not None:
        blob = zipnn.compress(bytearray(tensor.bits.tobytes()))
        row.sizes["zipnn"] = len(blob)
        row.is_exact["zipnn"] = zipnn.decompress(blob) == tensor.bits.tobytes()
    if dfloat11 is not None:
        result = dfloat11.size(tensor.bits, tensor.shape, dfloat11_max_numel)
        row.sizes["dfloat11"] = result.nbytes
        row.is_exact["dfloat11"] = result.is_exact
        if result.sampled_numel < tensor.numel:
            row.dfloat11_sampled_numel = result.sampled_numel
    return row


def size_totals(rows: list[TensorSizes]) -> dict:
    """Totals over the tensors, and per codec its reduction and its ratio to the bound."""
    original = sum(r.original_bytes for r in rows)
    bound = sum(r.bound_bytes for r in rows)
    totals = {"num_tensors": len(rows), "original_bytes": original, "bound_bytes": bound,
              "bound_reduction": 1 - bound / original if original else 0.0, "codecs": {}}
    for codec in CODECS:
        if not rows or any(codec not in r.sizes for r in rows):
            continue
        size = sum(r.sizes[codec] for r in rows)
        totals["codecs"][codec] = {
            "bytes": size, "reduction": 1 - size / original, "ratio_to_bound": size / bound,
            "is_exact": all(r.is_exact[codec] for r in rows)}
    sampled = [r for r in rows if r.dfloat11_sampled_numel is not None]
    if sampled and "dfloat11" in totals["codecs"]:
        totals["codecs"]["dfloat11"]["num_sampled_tensors"] = len(sampled)
    return totals
