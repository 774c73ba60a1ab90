"""Content hashes of full KV blocks, chained so a block's hash names its whole prefix.

Deterministic across processes and machines (SHA-256 of fixed-width token bytes, never
Python's salted `hash()`), so workers and a router can agree on which prefixes are where.
"""

from __future__ import annotations

import hashlib
from array import array
from collections.abc import Sequence

BlockHash = bytes  # 16 bytes


def root_hash(*parts: bytes | str) -> BlockHash:
    """The parent of a sequence's first block: whatever changes KV besides the tokens (the
    model's identity and dtype, later an adapter id), so equal tokens under another model
    never match."""
    digest = hashlib.sha256(b"ember-kv-v1")
    for part in parts:
        data = part.encode() if isinstance(part, str) else part
        digest.update(len(data).to_bytes(8, "little"))
        digest.update(data)
    return digest.digest()[:16]


def hash_block(parent: BlockHash, token_ids: Sequence[int]) -> BlockHash:
    """The hash of one full block, given its parent's hash."""
    digest = hashlib.sha256(parent)
    digest.update(array("q", token_ids).tobytes())
    return digest.digest()[:16]


def extend_block_hashes(hashes: list[BlockHash], root: BlockHash, token_ids: Sequence[int],
                        block_size: int, num_full_blocks: int) -> None:
    """Append the hashes of blocks len(hashes) .. num_full_blocks - 1 of token_ids."""
    parent = hashes[-1] if hashes else root
    for i in range(len(hashes), num_full_blocks):
        parent = hash_block(parent, token_ids[i * block_size:(i + 1) * block_size])
        hashes.append(parent)
