"""A small LRU of prompt-prefix KV caches for the embedded backend.

A causal model's keys and values at position ``i`` depend only on tokens ``0..i``, so the cache of
any earlier sequence serves every new prompt for the length of their common prefix: the shared
system prompt and few-shot turns of the critique and judge prompts, and a revision's earlier turns
(its prompt starts with its critique's prompt and answer). Entries are keyed by token-id tuples,
hold one ``(keys, values)`` pair of ``[1, heads, tokens, dim]`` tensors per layer, and are evicted
least recently used first once their total size passes ``max_bytes``. An entry whose tokens are a
prefix of a newer entry's is dropped (the newer one covers it).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

Layers = list[tuple[Any, Any]]  # per layer: (keys, values), torch tensors [1, H, T, D]


class EmbeddedSettings(BaseModel):
    """The embedded backend (transformers on the CPU; `embedded:` in a run config, `--embedded-*` flags)."""

    model_config = ConfigDict(extra="forbid")

    prefix_cache_mb: float = Field(512, ge=0, description="Embedded backend: MiB of KV cache kept for shared prompt "
                                   "prefixes (the few-shot turns, a revision's earlier turns), so a call computes "
                                   "only its new tokens; 0 turns it off.")


def common_prefix(a: tuple[int, ...], b: tuple[int, ...]) -> int:
    """Length of the longest common prefix of ``a`` and ``b`` (slice comparisons run in C)."""
    lo, hi = 0, min(len(a), len(b))
    if a[:hi] == b[:hi]:
        return hi
    while hi - lo > 1:  # a[:lo] == b[:lo] and a[:hi] != b[:hi]
        mid = (lo + hi) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid
    return lo


class PrefixCache:
    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.bytes = 0
        self._entries: OrderedDict[tuple[int, ...], tuple[Layers, int]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def lookup(self, ids: tuple[int, ...], limit: int) -> tuple[int, Layers | None]:
        """The longest cached prefix of ``ids`` (at most ``limit`` tokens): its length and its
        layers cut to that length (views: callers must not write into them)."""
        best, hit = 0, None
        for key in self._entries:
            n = min(common_prefix(key, ids), limit)
            if n > best:
                best, hit = n, key
        if hit is None:
            return 0, None
        self._entries.move_to_end(hit)
        layers = self._entries[hit][0]
        return best, [(k[:, :, :best], v[:, :, :best]) for k, v in layers]

    def store(self, ids: tuple[int, ...], layers: Layers) -> None:
        """Keep ``layers`` (the cache of exactly ``ids``; taken over, not copied) for later."""
        if not ids:
            return
        size = sum(k.element_size() * k.nelement() + v.element_size() * v.nelement()
                   for k, v in layers)
        if size > self.max_bytes:
            return
        for key in list(self._entries):
            if len(key) >= len(ids) and key[: len(ids)] == ids:  # already covered
                self._entries.move_to_end(key)
                return
            if len(key) < len(ids) and ids[: len(key)] == key:  # covered by the new one
                self.bytes -= self._entries.pop(key)[1]
        self._entries[ids] = (layers, size)
        self.bytes += size
        while self.bytes > self.max_bytes:
            self.bytes -= self._entries.popitem(last=False)[1][1]
