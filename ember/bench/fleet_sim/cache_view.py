"""The router's view of the simulated workers' prefix caches, kept from their KV event batches
as each step ends (zero lag): for a prompt, each worker's longest leading run of cached
blocks, in the shape `RoutingRequest.cached_tiers` takes.

Same answers as ember's `KVIndex.prefix_match` on device-only events (a test checks it), but
walks the prompt once with set intersections: at 64 workers all holding a long shared system
prompt, KVIndex's per-worker walk dominated the simulation's run time.
"""

from __future__ import annotations

from typing import Any


class FleetCacheView:
    def __init__(self, worker_urls: list[str]) -> None:
        self._holders: dict[str, set[str]] = {}  # block hash (hex) -> workers holding it
        self._urls = frozenset(worker_urls)

    def apply_events(self, worker_url: str, events: list[dict[str, Any]]) -> None:
        for event in events:
            if event["tier"] != "device":
                raise ValueError(f"the simulated workers have only a device tier, got "
                                 f"{event['tier']!r}")
            for block_hash in event["block_hashes"]:
                if event["type"] == "stored":
                    self._holders.setdefault(block_hash, set()).add(worker_url)
                else:
                    holders = self._holders[block_hash]
                    holders.discard(worker_url)
                    if not holders:
                        del self._holders[block_hash]

    def leading_blocks(self, block_hashes: list[str]) -> dict[str, int]:
        """{worker: leading blocks of block_hashes it holds}, workers holding none left out."""
        runs: dict[str, int] = {}
        if not block_hashes:
            return runs
        matching: set[str] | frozenset[str] = self._urls
        empty: set[str] = set()
        for idx, block_hash in enumerate(block_hashes):
            holders = self._holders.get(block_hash, empty)
            if matching <= holders:  # the common case: nobody drops out here
                continue
            still = matching & holders
            for url in matching - still:
                if idx:
                    runs[url] = idx
            if not still:
                return runs
            matching = still
        for url in matching:
            runs[url] = len(block_hashes)
        return runs

    def cached_tiers(self, block_hashes: list[str]) -> dict[str, list[str]]:
        return {url: ["device"] * num for url, num in self.leading_blocks(block_hashes).items()}
