"""KV transfer between workers: block layout arithmetic and transports (Mooncake, shared memory)
that write byte segments of this process's KV pool into a peer's. No request logic here.
"""

from ember.kv.transfer.base import KVTransferError, KVTransport, make_transport
from ember.kv.transfer.layout import BlockLayout, Segments, as_segments

__all__ = ["BlockLayout", "KVTransferError", "KVTransport", "Segments", "as_segments",
           "make_transport"]
