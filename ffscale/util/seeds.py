"""The one seed derivation: every random stream of a run is named by what it is for and where.

`derive(seed, "shards", epoch)` and `derive(seed, "step", rank, epoch, micro)` are independent,
reproducible in any process (no Python hash randomisation) and differ whenever any part differs,
which a sum such as seed + 1_000_003 * rank + step does not guarantee.
"""

from __future__ import annotations

import hashlib


def derive(seed: int, *parts: int | str) -> int:
    """A 63-bit seed from the run's seed and the parts naming one random stream."""
    h = hashlib.blake2b(digest_size=8)
    for p in (seed, *parts):
        h.update(f"{p}\x1f".encode())
    return int.from_bytes(h.digest(), "little") >> 1


def derive31(seed: int, *parts: int | str) -> int:
    """The same, below 2**31 (DALI takes a signed 32-bit seed)."""
    return derive(seed, *parts) % 2**31
