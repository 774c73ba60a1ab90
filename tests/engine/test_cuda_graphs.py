"""Decode-graph replay through static and persistent buffers equals an eager forward.

Without a GPU the 'graph' is a recorded closure replayed on the same buffers (what a CUDA
graph does), running the Triton kernels in the interpreter; with a GPU it is a real capture.
"""

from __future__ import annotations

import pytest
import torch

from ember.attention.backend import BatchLayout, allocate_kv_cache
from ember.attention.context import ForwardContext, forward_context
from ember.engine.cuda_graphs import DecodeGraphs, capture_sizes
from ember.model.loader import load_model

pytest.importorskip("triton")
from ember.attention.triton_backend import TritonBackend  # noqa: E402

BLOCK = 4


class RecordedGraph:
    """Replay = rerun the recorded work and write the result into the static output."""

    def __init__(self, fn, out):
        self.fn, self.out = fn, out

    def replay(self) -> None:
        self.out.copy_(self.fn())


def record(fn, pool):
    out = fn()
    return RecordedGraph(fn, out), out


def _step(model, backend, kv_caches, tables, computed, chunks, device):
    ids, positions, slots = [], [], []
    for s, chunk in chunks.items():
        span = range(computed[s], computed[s] + len(chunk))
        ids += chunk
        positions += span
        slots += [tables[s][p // BLOCK] * BLOCK + p % BLOCK for p in span]
    layout = BatchLayout([len(c) for c in chunks.values()],
                         [computed[s] + len(c) for s, c in chunks.items()],
                         [tables[s] for s in chunks], torch.tensor(slots), BLOCK)
    return layout, torch.tensor(ids, device=device), torch.tensor(positions, device=device)


def test_capture_sizes_cover_every_batch():
    assert capture_sizes(8) == [1, 2, 4, 8]
    assert capture_sizes(40) == [1, 2, 4, 8, 16, 32, 40]


@pytest.mark.parametrize("num_seqs", [3, 5])
def test_decode_graph_replay_matches_eager(tmp_path, num_seqs):
    from tests.factories import tiny_model_dir

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, info = load_model(tiny_model_dir(tmp_path), dtype="float32", device=device)
    backend = TritonBackend(max_num_seqs=8, max_num_tokens=64, max_blocks_per_seq=8)
    kv_caches = allocate_kv_cache(info.num_layers, 32, BLOCK, info.num_kv_heads, info.head_dim,
                                  info.dtype, device, backend)
    capture = record if device.type == "cpu" else None
    kwargs = {"capture": capture} if capture else {"pool": torch.cuda.graph_pool_handle()}
    graphs = DecodeGraphs(model, backend, kv_caches, 8, BLOCK, device, **kwargs)

    tables = [[4 * s + i for i in range(4)] for s in range(num_seqs)]
    computed = [0] * num_seqs
    prompts = {s: list(range(3 + s, 9 + 2 * s)) for s in range(num_seqs)}
    layout, ids, pos = _step(model, backend, kv_caches, tables, computed, prompts, device)
    with torch.inference_mode():
        meta = backend.build_metadata(layout, device)
        with forward_context(ForwardContext(backend, meta, kv_caches)):
            model(ids, pos)
        for s, p in prompts.items():
            computed[s] += len(p)
        for step in range(2):
            decode = {s: [10 + s + step] for s in range(num_seqs)}
            layout, ids, pos = _step(model, backend, kv_caches, tables, computed, decode, device)
            assert graphs.can_run(layout)
            backend.build_metadata(layout, device)
            replayed = graphs.run(ids, pos).clone()
            meta = backend.build_metadata(layout, device)
            with forward_context(ForwardContext(backend, meta, kv_caches)):
                eager = model(ids, pos)
            torch.testing.assert_close(replayed, eager, atol=1e-4, rtol=1e-4)
            for s in range(num_seqs):
                computed[s] += 1
