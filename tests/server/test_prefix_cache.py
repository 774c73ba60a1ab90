"""Prefix caching seen from the API: cached_tokens in usage, hit metrics, and a KV snapshot
whose block hashes this (other) process computes identically from the same tokens."""

from __future__ import annotations

import httpx
import torch

from ember.engine.block_hash import extend_block_hashes
from ember.engine.setup import model_cache_root
from tests.server.conftest import MODEL_NAME

SYSTEM = "You are a careful agent. " * 12


def _metric(server, name: str) -> float:
    text = httpx.get(f"{server.url}/metrics", timeout=10).text
    line = next(x for x in text.splitlines() if x.startswith(name + "{"))
    return float(line.rsplit(" ", 1)[1])


def test_a_repeated_prefix_is_reported_cached(client, server, tokenizer):
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "hi"}]
    hits_before = _metric(server, "ember:prefix_cache_hits_total")
    first = client.chat.completions.create(model=MODEL_NAME, messages=messages, max_tokens=2)
    second = client.chat.completions.create(model=MODEL_NAME, messages=messages + [
        {"role": "assistant", "content": "ok"}, {"role": "user", "content": "more"}],
        max_tokens=2)
    cached = second.usage.prompt_tokens_details.cached_tokens
    num_first = first.usage.prompt_tokens
    assert num_first // 16 * 16 - 16 <= cached <= second.usage.prompt_tokens - 1
    assert cached > 0
    assert _metric(server, "ember:prefix_cache_hits_total") - hits_before >= cached


def test_snapshot_hashes_match_this_process(server, model_dir, tokenizer):
    ids = tokenizer.encode("the cache block " * 20)
    httpx.post(f"{server.url}/v1/completions", timeout=30, json={
        "model": MODEL_NAME, "prompt": ids, "max_tokens": 1}).raise_for_status()
    snapshot = httpx.get(f"{server.url}/kv_cache/snapshot", timeout=10).json()
    assert snapshot["block_size"] == 16
    expected: list[bytes] = []
    extend_block_hashes(expected, model_cache_root(str(model_dir), torch.float32), ids, 16,
                        len(ids) // 16)
    assert {h.hex() for h in expected} <= set(snapshot["tiers"]["device"])
