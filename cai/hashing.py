"""Every hash cai computes: content digests, stable ids, per-call seeds, and unique ids.

The exact byte layouts matter: they are in cache keys, row ids, stage fingerprints and split
assignments written by earlier versions, so each helper keeps the layout it always had.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

T = TypeVar("T")


def sha256_json(obj: Any) -> str:
    """SHA-256 of compact, key-sorted JSON: fingerprints and digests."""
    blob = json.dumps(obj, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()


def short_id(obj: Any) -> str:
    """16 hex digits of the SHA-256 of key-sorted JSON (default separators): row and pair ids."""
    blob = json.dumps(obj, sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def hash_int(text: str, nbytes: int) -> int:
    """An unsigned integer from the BLAKE2b digest of ``text`` (seeds, draws, coin flips)."""
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=nbytes).digest(), "big")


def call_seed(*parts: object) -> int:
    """A reproducible 32-bit sampling seed from the run seed, row id and step: ``a|b|c``."""
    return hash_int("|".join(map(str, parts)), 4)


def unique_ids(items: Iterable[T], get_id: Callable[[T], str], with_id: Callable[[T, str], T]) -> Iterator[T]:
    """Keep ids unique in input order: a repeated id gets ``-2``, ``-3``..."""
    seen: dict[str, int] = {}
    for item in items:
        rid = get_id(item)
        n = seen[rid] = seen.get(rid, 0) + 1
        yield item if n == 1 else with_id(item, f"{rid}-{n}")
