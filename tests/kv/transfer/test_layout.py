"""BlockLayout segments, applied byte by byte to real pools, against copying blocks by index."""

import numpy as np
import pytest
import torch

from ember.kv.transfer.layout import BlockLayout, as_segments, merge_adjacent, split_segments

# [layers, 2, blocks, block_size, kv_heads, head_dim] (block axis 2) and the torch backend's
# head-major [layers, 2, kv_heads, blocks, block_size, head_dim] (block axis 3)
SHAPES = {2: (3, 2, 12, 4, 2, 8), 3: (3, 2, 2, 12, 4, 8)}


def _pool(shape: tuple[int, ...], seed: int, num_blocks: int | None = None,
          block_axis: int = 2) -> torch.Tensor:
    shape = list(shape)
    if num_blocks is not None:
        shape[block_axis] = num_blocks
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g).to(torch.bfloat16)


def _apply(segments: np.ndarray, src: torch.Tensor, dst: torch.Tensor) -> None:
    src_bytes, dst_bytes = src.view(-1).view(torch.uint8), dst.view(-1).view(torch.uint8)
    for s, d, n in segments.tolist():
        dst_bytes[d:d + n] = src_bytes[s:s + n]


def _reference(src: torch.Tensor, dst: torch.Tensor, src_ids: list[int], dst_ids: list[int],
               layers: list[int], block_axis: int) -> torch.Tensor:
    out = dst.clone()
    for layer in layers:
        for s, d in zip(src_ids, dst_ids):
            out[layer].select(block_axis - 1, d).copy_(src[layer].select(block_axis - 1, s))
    return out


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int16)


@pytest.mark.parametrize("block_axis", [2, 3])
@pytest.mark.parametrize("seed", range(6))
def test_segments_copy_what_indexing_copies(block_axis: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    shape = SHAPES[block_axis]
    src = _pool(shape, seed, block_axis=block_axis)
    dst = _pool(shape, seed + 100, num_blocks=16, block_axis=block_axis)
    num = int(rng.integers(1, 10))
    src_ids = rng.choice(12, num, replace=seed % 2 == 0).tolist()  # a source may repeat
    dst_ids = rng.choice(16, num, replace=False).tolist()
    if seed == 0:  # runs consecutive on both sides
        src_ids, dst_ids = [2, 3, 4, 9], [5, 6, 7, 1]
    layers = None if seed % 3 else rng.choice(3, 2, replace=False).tolist()
    src_layout = BlockLayout.from_pool(src, block_axis)
    segments = src_layout.segments(src_ids, dst_ids, layers=layers,
                                   dst=BlockLayout.from_pool(dst, block_axis))
    expected = _reference(src, dst, src_ids, dst_ids, layers or [0, 1, 2], block_axis)
    _apply(segments, src, dst)
    assert torch.equal(_bits(dst), _bits(expected))


def test_consecutive_runs_merge() -> None:
    layout = BlockLayout.from_shape((2, 2, 10, 4, 1, 8), element_size=2)
    assert layout.segment_bytes == 64 and layout.num_rows == 4
    one_block = layout.segments([3], [5])
    assert len(one_block) == 4  # one segment per (layer, K/V) row
    run = layout.segments([3, 4, 5], [6, 7, 8])
    assert run.tolist() == [[(r * 10 + 3) * 64, (r * 10 + 6) * 64, 3 * 64] for r in range(4)]
    shuffled = layout.segments([5, 3, 4], [8, 6, 7])
    assert shuffled.tolist() == run.tolist()
    broken = layout.segments([3, 4, 5], [6, 7, 9])
    assert len(broken) == 8


def test_whole_pool_is_one_segment() -> None:
    layout = BlockLayout.from_shape((4, 2, 10, 4, 1, 8), element_size=2)
    ids = list(range(10))
    assert layout.segments(ids, ids).tolist() == [[0, 0, layout.pool_bytes]]


def test_per_layer_segments_cover_only_that_layer() -> None:
    layout = BlockLayout.from_shape((4, 2, 2, 10, 4, 8), element_size=4, block_axis=3)
    assert layout.rows_per_layer == 4
    layer_bytes = layout.rows_per_layer * layout.num_blocks * layout.segment_bytes
    per_layer = [layout.segments([1, 7], [2, 0], layers=[i]) for i in range(4)]
    for i, segments in enumerate(per_layer):
        assert ((segments[:, 0] >= i * layer_bytes)
                & (segments[:, 0] + segments[:, 2] <= (i + 1) * layer_bytes)).all()
    everything = layout.segments([1, 7], [2, 0])
    assert sorted(np.concatenate(per_layer).tolist()) == sorted(everything.tolist())


def test_bad_ids_and_layouts_are_refused() -> None:
    layout = BlockLayout.from_shape((2, 2, 10, 4, 1, 8), element_size=2)
    with pytest.raises(ValueError, match="out of range"):
        layout.segments([10], [0])
    with pytest.raises(ValueError, match="destination block id -1"):
        layout.segments([0], [-1])
    with pytest.raises(ValueError, match="appears twice"):
        layout.segments([0, 1], [2, 2])
    with pytest.raises(ValueError, match="2 source block ids but 1"):
        layout.segments([0, 1], [2])
    with pytest.raises(ValueError, match="layer 2 out of range"):
        layout.segments([0], [1], layers=[2])
    other = BlockLayout.from_shape((2, 2, 10, 4, 2, 8), element_size=2)
    with pytest.raises(ValueError, match="segment_bytes"):
        layout.segments([0], [1], dst=other)
    assert layout.segments([], []).shape == (0, 3)


def test_from_descriptor_matches_from_pool() -> None:
    pool = torch.zeros(SHAPES[3], dtype=torch.float16)
    descriptor = {"shape": list(pool.shape), "element_size": pool.element_size()}
    assert BlockLayout.from_descriptor(descriptor, 3) == BlockLayout.from_pool(pool, 3)


def test_merge_adjacent_and_as_segments() -> None:
    segments = as_segments([(0, 100, 8), (8, 108, 8), (16, 200, 8), (40, 208, 8)])
    assert merge_adjacent(segments).tolist() == [[0, 100, 16], [16, 200, 8], [40, 208, 8]]
    with pytest.raises(ValueError, match="triples"):
        as_segments([(1, 2)])


def test_split_segments_cuts_long_ones_in_order() -> None:
    segments = as_segments([(0, 1000, 10), (100, 0, 25), (50, 60, 4)])
    assert split_segments(segments, 10).tolist() == [
        [0, 1000, 10], [100, 0, 10], [110, 10, 10], [120, 20, 5], [50, 60, 4]]
    assert split_segments(segments, 25) is segments
    assert split_segments(as_segments([]), 8).shape == (0, 3)
