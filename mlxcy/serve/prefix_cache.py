"""A prefix cache across requests: batch-1 KV caches keyed by the token ids
they hold, least recently used first out, bounded by a byte budget.

A request looks up the entry sharing the longest prefix with its prompt and
gets a *copy* of it trimmed to that prefix (the copy shares the entry's MLX
buffers; MLX writes in place only into a buffer nobody else holds, so the
entry is never changed by the sequence that uses the copy).  When a sequence
ends, the engine hands its cache back (keep_cache=True) and it is stored
under prompt + the generated ids it holds, replacing any entry whose ids are
a prefix of those.

Owned by the engine's thread: MLX arrays are made and used on one thread.
"""
from __future__ import annotations

from collections import OrderedDict

__all__ = ["PrefixCache"]


def _common_prefix(a, b) -> int:
    n = min(len(a), len(b))
    i = 0
    # compare in blocks first (cheap on long prompts), then token by token
    step = 64
    while i + step <= n and a[i:i + step] == b[i:i + step]:
        i += step
    while i < n and a[i] == b[i]:
        i += 1
    return i


class PrefixCache:
    """LRU of (ids, Cache) within `budget` bytes."""

    def __init__(self, make_cache, budget: int, min_tokens: int = 1):
        self.make_cache = make_cache
        self.budget = int(budget)
        self.min_tokens = max(1, int(min_tokens))
        self.entries: OrderedDict = OrderedDict()    # key -> (ids tuple, cache, nbytes)
        self._next = 0
        self.bytes = 0
        self.hits = 0
        self.misses = 0
        self.evictions = 0

    def __len__(self):
        return len(self.entries)

    def lookup(self, ids):
        """(cache or None, n): a fresh cache holding the first n ids of `ids`
        (n < len(ids), so at least one token is left to prefill)."""
        ids = tuple(ids)
        limit = len(ids) - 1
        best, best_n = None, 0
        for key, (eids, cache, _) in self.entries.items():
            n = min(_common_prefix(eids, ids), limit)
            if n > best_n and _can_trim(cache, cache.offset - n):
                best, best_n = key, n
        if best is None or best_n < self.min_tokens:
            self.misses += 1
            return None, 0
        self.entries.move_to_end(best)
        src = self.entries[best][1]
        out = _copy(src, self.make_cache())
        if out.offset > best_n:
            out.trim(out.offset - best_n)
        self.hits += 1
        return out, best_n

    def insert(self, ids, cache) -> bool:
        """Store `cache` (which holds exactly `ids`); takes ownership.  False
        (and the cache freed) when it alone exceeds the budget."""
        ids = tuple(ids)
        if cache.offset != len(ids) or not ids:
            cache.free()
            return False
        nbytes = int(cache.nbytes)
        if nbytes > self.budget:
            cache.free()
            return False
        for key, (eids, ecache, eb) in list(self.entries.items()):
            if len(eids) <= len(ids) and ids[:len(eids)] == eids:
                self._drop(key)            # superseded by a longer entry
            elif len(eids) > len(ids) and eids[:len(ids)] == ids:
                cache.free()               # an entry already holds all of it
                self.entries.move_to_end(key)
                return False
        self._next += 1
        self.entries[self._next] = (ids, cache, nbytes)
        self.bytes += nbytes
        while self.bytes > self.budget and self.entries:
            self._drop(next(iter(self.entries)))
            self.evictions += 1
        return True

    def _drop(self, key):
        ids, cache, nbytes = self.entries.pop(key)
        self.bytes -= nbytes
        cache.free()

    def clear(self):
        for key in list(self.entries):
            self._drop(key)


def _can_trim(cache, n) -> bool:
    """Whether trimming n positions is exact: a sliding-window layer that
    already dropped positions cannot go back."""
    if n <= 0:
        return True
    for layer in cache.layers:
        if layer.window and layer.offset > layer.window:
            return False
    return True


def _copy(src, dst):
    """dst (an empty cache of the same model) takes src's buffers and counters."""
    for a, b in zip(src.layers, dst.layers):
        st = a.state()
        b.set_state(st["keys"], st["values"], st["offset"], st["filled"], st["idx"])
    return dst
