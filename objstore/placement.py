"""Where a blob's copies live: rendezvous (highest random weight) hashing.

Each node gets a weight for each blob, SHA-256(node id | 0 | blob hash) read as
a number; the blob's replicas are the R nodes of highest weight, in order.
Every node computes the same list from the same membership, with no table to
agree on, and when a node joins or leaves only the blobs whose top R change
move (about R/N of them) — Thaler & Ravishankar, "Using name-based mappings to
increase hit rates" (1998).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence


def weight(node_id: str, blob_hash: bytes) -> int:
    return int.from_bytes(hashlib.sha256(node_id.encode() + b"\0" + blob_hash).digest()[:8], "big")


def replicas(blob_hash: bytes, nodes: Sequence[str], r: int = 3) -> list[str]:
    """The blob's replica nodes, most preferred first (all nodes if fewer than r)."""
    return sorted(nodes, key=lambda n: (weight(n, blob_hash), n), reverse=True)[:r]
