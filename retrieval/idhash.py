"""Id -> row lookups without a Python dict: a sorted array of 64-bit id hashes per segment, memory-mapped.

A dict of 10^7 string ids costs about a gigabyte of heap; a sorted ``uint64`` array of their hashes beside the row
each came from costs 16 bytes per item on disk and nothing on the heap once memory-mapped. A lookup hashes the asked
ids, binary-searches them (``np.searchsorted``) and checks each candidate's id in the Arrow column, so a hash
collision can never return the wrong item. The hash is BLAKE2b truncated to 8 bytes (``hashlib``): stable across
processes, Python versions and machines, which Python's own ``hash`` of a str is not.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np

HASH_NAME = "blake2b-64"


def hash_ids(ids: Sequence[str]) -> np.ndarray:
    """The uint64 hash of each id (BLAKE2b, 8 bytes, little-endian)."""
    digests = b"".join(hashlib.blake2b(i.encode("utf-8"), digest_size=8).digest() for i in ids)
    return np.frombuffer(digests, dtype="<u8").astype(np.uint64, copy=False)


def build_lookup(ids: Sequence[str]) -> np.ndarray:
    """2 × N uint64: the hashes of ``ids`` sorted, and under each the position of its id in ``ids``."""
    hashes = hash_ids(ids)
    order = np.argsort(hashes, kind="stable")
    return np.stack([hashes[order], order.astype(np.uint64)])


def candidates(lookup: np.ndarray, hashes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(which, positions)``: for each position whose hash equals ``hashes[which]`` (collisions included)."""
    sorted_hashes = lookup[0]
    left = np.searchsorted(sorted_hashes, hashes, side="left")
    right = np.searchsorted(sorted_hashes, hashes, side="right")
    counts = right - left
    which = np.repeat(np.arange(len(hashes)), counts)
    starts = np.repeat(left - np.cumsum(counts) + counts, counts)
    offsets = np.arange(int(counts.sum())) + starts
    return which, lookup[1][offsets].astype(np.int64)
