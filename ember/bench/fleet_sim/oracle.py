"""The oracle's hit count: what an unbounded prefix cache shared by the whole fleet would give.

A request's oracle-cached tokens are the longest block-aligned prefix of its prompt that some
earlier-arriving request computes (its prompt and all but its last output token, whose KV an
engine never computes), capped at prompt - 1 as the engine caps a hit. Timing is ignored: a
prefix counts even if the request computing it is still prefilling, so no real fleet can beat
it.
"""

from __future__ import annotations

from ember.engine.block_hash import BlockHash


class Oracle:
    def __init__(self, block_size: int) -> None:
        self.block_size = block_size
        self._computed: set[BlockHash] = set()

    def arrive(self, block_hashes: list[BlockHash], num_prompt_tokens: int,
               max_tokens: int) -> int:
        """The request's oracle-cached prompt tokens; then its own blocks count as computed."""
        num_matched = 0
        for block_hash in block_hashes[:num_prompt_tokens // self.block_size]:
            if block_hash not in self._computed:
                break
            num_matched += 1
        num_blocks = (num_prompt_tokens + max_tokens - 1) // self.block_size
        self._computed.update(block_hashes[num_matched:num_blocks])
        return min(num_matched * self.block_size, num_prompt_tokens - 1)
