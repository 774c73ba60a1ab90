"""What the router knows of its workers' prefix caches: a request's block hashes (computed as
the workers compute them, from the model's tokenizer and the workers' root hash), matched
against the KV index that workers' events keep, or against an approximate index of what was
routed where for workers that publish no events."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from ember.engine.block_hash import extend_block_hashes
from ember.router.fleet import Fleet
from ember.router.kv_index import (
    ApproxPrefixIndex,
    KVEventSubscriber,
    KVIndex,
    http_snapshot_fetcher,
)

logger = logging.getLogger(__name__)


class CacheView:
    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.index = KVIndex()
        self.approx = ApproxPrefixIndex()
        self.root: bytes | None = None
        self.block_size = 16
        self._subscribers: dict[str, tuple[KVEventSubscriber, asyncio.Task]] = {}
        self._approx_workers: set[str] = set()

    # ---- workers -------------------------------------------------------------------------

    async def sync(self, fleet: Fleet) -> None:
        """Follow every healthy worker's events (or fall back to the approximate index);
        forget workers that left."""
        for url in list(self._subscribers):
            if url not in fleet.workers:
                subscriber, task = self._subscribers.pop(url)
                subscriber.close()
                task.cancel()
                self.index.remove_worker(url)
        self._approx_workers &= set(fleet.workers)
        for worker in fleet.eligible():
            if worker.url not in self._subscribers and worker.url not in self._approx_workers:
                await self._join(worker.url)

    def indexed_blocks(self, url: str) -> int:
        """Blocks the router believes `url` holds: from its KV events, or else from where it
        sent prompts."""
        return self.index.num_blocks(url) + self.approx.num_blocks(url)

    async def _join(self, url: str) -> None:
        fetch = http_snapshot_fetcher(url)
        try:
            snapshot = await fetch()
        except Exception as exc:  # not serving yet: the next sync retries
            logger.info("no KV snapshot from %s yet: %r", url, exc)
            return
        if snapshot.get("root"):
            self.root = bytes.fromhex(snapshot["root"])
            self.block_size = int(snapshot.get("block_size", self.block_size))
        if not snapshot.get("endpoint"):
            self._approx_workers.add(url)
            return
        subscriber = KVEventSubscriber(url, snapshot["endpoint"], self.index, fetch)
        self._subscribers[url] = (subscriber, asyncio.create_task(subscriber.run()))

    async def close(self) -> None:
        for subscriber, task in self._subscribers.values():
            subscriber.close()
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    # ---- requests ------------------------------------------------------------------------

    def prompt_tokens(self, payload: dict[str, Any]) -> list[int] | None:
        """The prompt's token ids as a worker would build them (None: not computable)."""
        try:
            if "messages" in payload:
                text = self.tokenizer.apply_chat_template(
                    payload["messages"], tools=payload.get("tools"), tokenize=False,
                    add_generation_prompt=payload.get("add_generation_prompt", True))
                return self.tokenizer.encode(text, add_special_tokens=False)
            prompt = payload.get("prompt")
            if isinstance(prompt, str):
                return self.tokenizer.encode(prompt)
            if isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
                return prompt
        except Exception:  # a malformed request: the worker will say what is wrong
            return None
        return None

    def block_hashes(self, token_ids: list[int]) -> list[str]:
        if self.root is None:
            return []
        hashes: list[bytes] = []
        extend_block_hashes(hashes, self.root, token_ids, self.block_size,
                            len(token_ids) // self.block_size)
        return [h.hex() for h in hashes]

    def cached_tiers(self, hashes: list[str]) -> dict[str, list[str]]:
        if not hashes:
            return {}
        tiers = self.index.prefix_match(hashes)
        if self._approx_workers:
            for url, matched in self.approx.prefix_match(hashes).items():
                if url in self._approx_workers:
                    tiers[url] = matched
        return tiers

    def routed(self, url: str, hashes: list[str]) -> None:
        if url in self._approx_workers and hashes:
            self.approx.record(url, hashes)
