"""BlockLayout: where each KV block's bytes lie in a pool tensor, and the byte segments that
copy a list of blocks from one pool into another (merged where both sides run on).

Pure arithmetic on shapes; it never touches tensor memory.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

# [num_segments, 3] int64: src_offset, dst_offset, nbytes (byte offsets into each pool)
Segments = np.ndarray


def as_segments(segments: Segments | Sequence[tuple[int, int, int]]) -> Segments:
    """Segments as a [n, 3] int64 array (accepts a list of (src, dst, nbytes) triples)."""
    array = np.asarray(segments, dtype=np.int64)
    if array.size == 0:
        return np.zeros((0, 3), dtype=np.int64)
    if array.ndim != 2 or array.shape[1] != 3:
        raise ValueError(f"segments must be (src_offset, dst_offset, nbytes) triples, "
                         f"got shape {array.shape}")
    return array


@dataclass(frozen=True)
class BlockLayout:
    """A pool shaped [num_layers, *rows, num_blocks, *block], contiguous.

    Every axis between the layer and the block axis is a "row" (K/V, and kv heads in the torch
    backend's head-major layout); one block is one `segment_bytes` run in each row, at
    ((layer * rows_per_layer + row) * num_blocks + block) * segment_bytes.
    """

    num_layers: int
    rows_per_layer: int
    num_blocks: int
    segment_bytes: int

    @classmethod
    def from_shape(cls, shape: Sequence[int], element_size: int,
                   block_axis: int = 2) -> BlockLayout:
        """`block_axis`: the pool axis of blocks, i.e. the attention backend's block_dim + 1
        (2 for [layers, 2, blocks, block_size, kv_heads, head_dim])."""
        if not 1 <= block_axis < len(shape):
            raise ValueError(f"block_axis {block_axis} is not an inner axis of shape "
                             f"{tuple(shape)}")
        return cls(num_layers=int(shape[0]), rows_per_layer=math.prod(shape[1:block_axis]),
                   num_blocks=int(shape[block_axis]),
                   segment_bytes=math.prod(shape[block_axis + 1:]) * element_size)

    @classmethod
    def from_pool(cls, pool: object, block_axis: int = 2) -> BlockLayout:
        """From a torch tensor (reads only its shape and element size)."""
        return cls.from_shape(tuple(pool.shape), pool.element_size(), block_axis)

    @classmethod
    def from_descriptor(cls, descriptor: dict, block_axis: int = 2) -> BlockLayout:
        """A peer's pool layout, from its transport descriptor."""
        return cls.from_shape(descriptor["shape"], descriptor["element_size"], block_axis)

    @property
    def num_rows(self) -> int:
        return self.num_layers * self.rows_per_layer

    @property
    def block_bytes(self) -> int:
        """One block of every layer."""
        return self.num_rows * self.segment_bytes

    @property
    def pool_bytes(self) -> int:
        return self.num_rows * self.num_blocks * self.segment_bytes

    def segments(self, src_block_ids: Sequence[int], dst_block_ids: Sequence[int],
                 layers: Sequence[int] | None = None,
                 dst: BlockLayout | None = None) -> Segments:
        """Segments that copy block src_block_ids[i] of this pool to dst_block_ids[i] of `dst`
        (default: a pool of this layout), for `layers` (default: all, in order).

        Pairs are sorted by source id, and runs consecutive on both sides merge into one
        segment (across rows too, where a run fills whole rows on both sides).
        """
        dst = dst or self
        self._check_compatible(dst)
        src_ids, dst_ids = _check_ids(src_block_ids, dst_block_ids, self.num_blocks,
                                      dst.num_blocks)
        rows = self._rows(layers)
        if src_ids.size == 0 or rows.size == 0:
            return np.zeros((0, 3), dtype=np.int64)
        run_src, run_dst, run_len = _runs(src_ids, dst_ids)
        seg = self.segment_bytes
        src_off = (rows[:, None] * self.num_blocks + run_src[None, :]) * seg
        dst_off = (rows[:, None] * dst.num_blocks + run_dst[None, :]) * seg
        nbytes = np.broadcast_to(run_len[None, :] * seg, src_off.shape)
        flat = np.stack([src_off.ravel(), dst_off.ravel(), nbytes.ravel()], axis=1)
        return merge_adjacent(flat)

    def _rows(self, layers: Sequence[int] | None) -> np.ndarray:
        if layers is None:
            return np.arange(self.num_rows, dtype=np.int64)
        layer_ids = np.asarray(layers, dtype=np.int64).reshape(-1)
        bad = layer_ids[(layer_ids < 0) | (layer_ids >= self.num_layers)]
        if bad.size:
            raise ValueError(f"layer {int(bad[0])} out of range [0, {self.num_layers})")
        within = np.arange(self.rows_per_layer, dtype=np.int64)
        return (layer_ids[:, None] * self.rows_per_layer + within[None, :]).ravel()

    def _check_compatible(self, dst: BlockLayout) -> None:
        for field in ("num_layers", "rows_per_layer", "segment_bytes"):
            if getattr(self, field) != getattr(dst, field):
                raise ValueError(f"pools differ in {field}: {getattr(self, field)} here, "
                                 f"{getattr(dst, field)} at the destination")


def _check_ids(src_block_ids: Sequence[int], dst_block_ids: Sequence[int], num_src: int,
               num_dst: int) -> tuple[np.ndarray, np.ndarray]:
    src = np.asarray(src_block_ids, dtype=np.int64).reshape(-1)
    dst = np.asarray(dst_block_ids, dtype=np.int64).reshape(-1)
    if src.shape != dst.shape:
        raise ValueError(f"{src.size} source block ids but {dst.size} destination block ids")
    for name, ids, limit in (("source", src, num_src), ("destination", dst, num_dst)):
        bad = ids[(ids < 0) | (ids >= limit)]
        if bad.size:
            raise ValueError(f"{name} block id {int(bad[0])} out of range [0, {limit})")
    if np.unique(dst).size != dst.size:
        raise ValueError("a destination block id appears twice")
    return src, dst


def _runs(src: np.ndarray, dst: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(start_src, start_dst, length) of maximal runs consecutive on both sides."""
    order = np.argsort(src, kind="stable")
    src, dst = src[order], dst[order]
    breaks = (np.diff(src) != 1) | (np.diff(dst) != 1)
    starts = np.concatenate([[0], np.flatnonzero(breaks) + 1])
    lengths = np.diff(np.concatenate([starts, [src.size]]))
    return src[starts], dst[starts], lengths


def merge_adjacent(segments: Segments) -> Segments:
    """Join each segment with the next where both its source and destination continue."""
    if len(segments) < 2:
        return segments
    src, dst, nbytes = segments[:, 0], segments[:, 1], segments[:, 2]
    continues = (src[:-1] + nbytes[:-1] == src[1:]) & (dst[:-1] + nbytes[:-1] == dst[1:])
    starts = np.concatenate([[0], np.flatnonzero(~continues) + 1])
    totals = np.add.reduceat(nbytes, starts)
    return np.stack([src[starts], dst[starts], totals], axis=1)


def split_segments(segments: Segments, max_bytes: int) -> Segments:
    """The same copy with no segment longer than `max_bytes` (long ones cut in order)."""
    counts = -(-segments[:, 2] // max_bytes)
    if len(segments) == 0 or counts.max() <= 1:
        return segments
    pieces = np.repeat(segments, counts, axis=0)
    shift = (np.arange(len(pieces)) - np.repeat(np.cumsum(counts) - counts, counts)) * max_bytes
    pieces[:, 0] += shift
    pieces[:, 1] += shift
    pieces[:, 2] = np.minimum(pieces[:, 2] - shift, max_bytes)
    return pieces
