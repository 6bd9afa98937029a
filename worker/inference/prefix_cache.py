"""Reuse of a conversation's key/value cache from one turn to the next.

A turn's prompt is the previous turn's prompt and reply plus the new message, so most of it
was already run through the model when the previous turn was generated. The engine loop
keeps each finished turn's cache, keyed by conversation, and the next turn prefills only what
follows the longest common prefix of token ids. Least recently used entries are dropped to
stay within a memory budget. A turn that lands on another worker, or whose window dropped
old turns, misses and is prefilled whole. Beside its keys and values an entry keeps the turn's
`Transcript` (its prompt and generated ids), from which the next prompt is built with the same
ids (prompt.py), so that the prefix matches through the last reply.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass, replace

import torch

from worker.inference.engine_types import PrefixCacheCounts
from worker.inference.prompt import Transcript

Layers = list[tuple[torch.Tensor, torch.Tensor]]

# Below this many shared tokens a hit saves less than it costs to set up.
MIN_SHARED_TOKENS = 16


@dataclass(frozen=True)
class _Entry:
    ids: list[int]
    layers: Layers  # per layer (keys, values), [1, heads, len(ids), head_dim]
    size: int  # bytes of the buffers under them, room to grow included
    transcript: Transcript | None = None


@dataclass(frozen=True)
class PrefixHit:
    shared: int  # leading tokens of the prompt whose keys and values are in `layers`
    layers: Layers


class PrefixCache(PrefixCacheCounts):
    def __init__(self, *, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        super().__init__()

    def lookup(self, key: str, ids: list[int]) -> PrefixHit | None:
        """The cached prefix of `ids`, leaving at least one token to prefill (for its logits)."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                self._entries.move_to_end(key)
        shared = 0 if entry is None else _common_prefix(entry.ids, ids, limit=len(ids) - 1)
        if entry is None or shared < MIN_SHARED_TOKENS:
            self.misses += 1
            return None
        self.hits += 1
        self.reused_tokens += shared
        return PrefixHit(shared, [(k[:, :, :shared], v[:, :, :shared]) for k, v in entry.layers])

    def kept(self, key: str) -> Layers | None:
        """The keys and values kept for ``key``, whose buffers its next store may be copied
        into (SlotCache.row_prefix): that store replaces them."""
        with self._lock:
            entry = self._entries.get(key)
        return None if entry is None else entry.layers

    def store(self, key: str, ids: list[int], layers: Layers) -> None:
        """Keep ``layers`` for ``key`` in place of what was kept for it (always dropped: it
        may have been overwritten by this store's copy, see `kept`)."""
        size = _buffer_bytes(layers)
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self._bytes -= old.size
            if size > self.max_bytes:
                return
            self._entries[key] = _Entry(ids, layers, size)
            self._bytes += size
            while self._bytes > self.max_bytes:
                _, dropped = self._entries.popitem(last=False)
                self._bytes -= dropped.size

    def remember(self, key: str, transcript: Transcript) -> None:
        """Keep the turn ``transcript`` beside the keys and values stored for it."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None and transcript.ids[: len(entry.ids)] == entry.ids:
                self._entries[key] = replace(entry, transcript=transcript)

    def last_turn(self, key: str) -> Transcript | None:
        with self._lock:
            entry = self._entries.get(key)
        return None if entry is None else entry.transcript


def _buffer_bytes(layers: Layers) -> int:
    """Memory the layers hold: their buffers whole, room to grow included."""
    return sum(k.untyped_storage().nbytes() + v.untyped_storage().nbytes() for k, v in layers)


def _common_prefix(a: list[int], b: list[int], *, limit: int) -> int:
    n = min(len(a), len(b), limit)
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n
