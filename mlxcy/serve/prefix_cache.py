"""A prefix cache across requests: a radix tree of token runs, each node
holding the KV of its run's positions, least recently used leaves first out,
bounded by a byte budget.

Every path from the root spells a token sequence some finished request held
(its prompt and the tokens it generated); a node holds, for every layer, the
keys/values of the positions its run covers (its own copies, so that a node
is freed alone).  Two conversations that share a system prompt share the
nodes of that prompt: its KV is stored once.

    lookup(ids)      -> (a new batch-1 cache holding ids[:n], n): the longest
                        prefix of ids the tree holds (n < len(ids), so at least
                        one token is left to prefill; n >= min_tokens, else a
                        miss); the path is marked used
    insert(ids, c)   stores cache c (which holds exactly ids): only the part of
                        ids not yet in the tree is copied; then evicts the least
                        recently used leaves until the bytes fit the budget
    flush()          computes the copies inserts made (lazily) since the last
                        flush, in one evaluation: a server flushes once per step
                        rather than waiting for each finished sequence's copy

A short prefix is not worth a hit: building its cache copies every layer's
keys and values (on a GPU, a few kernels per layer, each costing host time),
while prefilling a few more tokens inside a batch costs next to nothing there.
`min_tokens` sets the shortest prefix a lookup uses.

The KV at position p depends only on tokens 0..p, so the positions along a
path, concatenated, are the cache of the path's prefix.

Sliding-window (rotating) layers keep only their last W positions: a cache
whose ring wrapped brings, for those layers, only positions [offset - W,
offset).  A node records per window size the first position it holds (`held`);
positions before it are a hole for those layers.  A prefix of length n is
usable when every window's layers hold positions [n - min(n, W), n) along the
path; lookup returns the longest usable one.  A later insert that brings
positions a node lacks fills them in.

Owned by the engine's thread: MLX arrays are made and used on one thread.
"""
from __future__ import annotations

from mlxcy import ops
from mlxcy.transforms import eval as _eval

__all__ = ["PrefixCache"]


class _Node:
    __slots__ = ("children", "end", "held", "kv", "nbytes", "parent", "start", "tick",
                 "tokens")

    def __init__(self, tokens, start, parent):
        self.tokens = tokens            # tuple: the run of ids on the edge into this node
        self.start = start              # the position of tokens[0]
        self.end = start + len(tokens)
        self.parent = parent
        self.children = {}              # first token -> _Node
        self.kv = None                  # per layer (keys, values) [1, H, end - first held, D], or None
        self.held = {}                  # window -> first position held (0: unbounded layers)
        self.nbytes = 0
        self.tick = 0


def _common(a, b) -> int:
    """Length of the common prefix of two sequences."""
    n = min(len(a), len(b))
    i = 0
    while i + 64 <= n and a[i:i + 64] == b[i:i + 64]:   # in blocks first: cheap on long runs
        i += 64
    while i < n and a[i] == b[i]:
        i += 1
    return i


def _own(x):
    """A copy of x in a buffer of its own (a slice is a view that keeps the
    whole buffer it was cut from alive); lazy until evaluated."""
    empty = ops.zeros((x.shape[0], x.shape[1], 0, x.shape[3]), x.dtype)
    return ops.concatenate([x, empty], 2)


def _own_all(xs):
    """Copies of the arrays xs (lazy).  When they share a shape (the layers
    of a model without sliding windows) the copies are views of one stacked
    buffer: one allocation for a node's whole run instead of two per layer
    (on a GPU, thousands of fresh small buffers per wave of finished
    sequences cost more than the copies themselves)."""
    if len(xs) > 1 and len({tuple(x.shape) for x in xs}) == 1:
        big = ops.stack(xs, 0)
        return [big[i] for i in range(len(xs))]
    return [_own(x) for x in xs]


def _positions(layer):
    """(keys, values, first): a layer's held positions [first, offset) in
    temporal order, as views of its buffers ([1, H, n, D]); keys None when empty."""
    st = layer.state()
    off = st["offset"]
    k, v = st["keys"], st["values"]
    if k is None or off == 0:
        return None, None, off
    w = layer.window
    if w == 0:
        return k[:, :, :off], v[:, :, :off], 0
    filled, idx = st["filled"], st["idx"]
    if filled < w:
        return k[:, :, :filled], v[:, :, :filled], off - filled
    k, v = k[:, :, :w], v[:, :, :w]
    if idx:        # the ring's oldest slot is idx
        k = ops.concatenate([k[:, :, idx:], k[:, :, :idx]], 2)
        v = ops.concatenate([v[:, :, idx:], v[:, :, :idx]], 2)
    return k, v, off - w


class PrefixCache:
    """Radix tree of KV runs within `budget` bytes (see the module doc)."""

    def __init__(self, make_cache, budget: int, min_tokens: int = 1):
        if min_tokens < 1:
            raise ValueError(f"min_tokens: must be >= 1, got {min_tokens}")
        self.make_cache = make_cache
        self.budget = int(budget)
        self.min_tokens = int(min_tokens)
        self._pending = []               # copies made by inserts, not yet computed
        self.windows = [layer.window for layer in make_cache().layers]
        self.root = _Node((), 0, None)
        self._tick = 0
        self.bytes = 0
        self.nodes = 0
        self.hits = 0
        self.misses = 0
        self.evictions = 0

    def __len__(self):
        return self.nodes

    # ---------------------------------------------------------------- lookup --
    def lookup(self, ids):
        """(cache or None, n): a fresh cache holding the first n ids of `ids`."""
        ids = tuple(ids)
        limit = len(ids) - 1
        path, pos, node = [], 0, self.root
        while pos < limit:
            child = node.children.get(ids[pos])
            if child is None:
                break
            m = _common(child.tokens, ids[pos:limit])
            path.append((child, m))
            pos += m
            if m < len(child.tokens):
                break
            node = child
        n = self._usable(path, pos)
        if n < self.min_tokens:
            self.misses += 1
            return None, 0
        self.flush()
        self._tick += 1
        for node, _ in path:
            node.tick = self._tick
        self.hits += 1
        return self._build(path, n), n

    def _usable(self, path, n) -> int:
        """The longest n' <= n whose positions every layer holds along `path`."""
        holes = {}                       # window -> [(x, y)]: positions not held
        for node, used in path:
            for w, h in node.held.items():
                if w and h > node.start:
                    holes.setdefault(w, []).append((node.start, min(h, node.start + used)))
        changed = True
        while changed and n > 0:
            changed = False
            for w, hs in holes.items():
                lo = n - min(n, w)
                for x, y in reversed(hs):
                    if x < n and y > lo:     # a hole inside [lo, n): end before it
                        n, changed = x, True
                        break
        return n

    def _build(self, path, n):
        cache = self.make_cache()
        for li, layer in enumerate(cache.layers):
            w = self.windows[li]
            lo = n - min(n, w) if w else 0
            ks, vs = [], []
            for node, _ in path:
                first = node.held[w]
                a, b = max(lo, first, node.start), min(n, node.end)
                if a >= b:
                    continue
                k, v = node.kv[li]
                ks.append(k[:, :, a - first:b - first])
                vs.append(v[:, :, a - first:b - first])
            k = ks[0] if len(ks) == 1 else ops.concatenate(ks, 2)
            v = vs[0] if len(vs) == 1 else ops.concatenate(vs, 2)
            if w:
                filled = n - lo
                layer.set_state(k, v, n, filled, filled % w)
            else:
                layer.set_state(k, v, n)
        return cache

    # ---------------------------------------------------------------- insert --
    def insert(self, ids, cache) -> bool:
        """Store `cache` (which holds exactly `ids`); takes ownership (it is
        freed).  True when the tree gained positions."""
        ids = tuple(ids)
        try:
            if not ids or cache.offset != len(ids):
                return False
            return self._insert(ids, cache)
        finally:
            cache.free()

    def _insert(self, ids, cache):
        n = len(ids)
        held = [_positions(layer) for layer in cache.layers]
        if any(k is None for k, _, _ in held):
            return False
        first = {}                       # window -> first position the cache holds
        for w, (_, _, f) in zip(self.windows, held):
            first[w] = f
        self._tick += 1
        node, pos, grew = self.root, 0, False
        while pos < n:
            child = node.children.get(ids[pos])
            if child is None:
                break
            m = _common(child.tokens, ids[pos:])
            if m < len(child.tokens):
                if pos + m == n and not self._lacks(child, first, n):
                    child.tick = self._tick          # ids end inside this run: nothing new
                    pos = n
                    break
                child = self._split(child, m)
            child.tick = self._tick
            grew |= self._fill(child, held, first)
            node, pos = child, pos + m
        if pos < n:
            new = _Node(ids[pos:], pos, node)
            new.tick = self._tick
            self._store(new, held, first)
            if new.nbytes <= self.budget:
                node.children[ids[pos]] = new
                self.bytes += new.nbytes
                self.nodes += 1
                grew = True
            else:
                new.kv = None
        self._evict()
        return grew

    def _store(self, node, held, first, windows=None):
        """Give `node` copies of the cache's positions in its run (for the
        layers of `windows` only, when given)."""
        if node.kv is None:
            node.kv = [None] * len(self.windows)
        for w, f in first.items():
            if windows is None or w in windows:
                node.held[w] = min(node.end, max(node.start, f))
        layers, parts = [], []
        for li, (w, (k, v, f)) in enumerate(zip(self.windows, held)):
            if windows is not None and w not in windows:
                continue
            a = node.held[w]
            layers.append(li)
            parts += [k[:, :, a - f:node.end - f], v[:, :, a - f:node.end - f]]
        owned = _own_all(parts)
        for j, li in enumerate(layers):
            node.kv[li] = (owned[2 * j], owned[2 * j + 1])
        self._pending.extend(x for kv in node.kv for x in kv)
        node.nbytes = sum(k.nbytes + v.nbytes for k, v in node.kv)

    @staticmethod
    def _lacks(node, first, end) -> bool:
        """Whether the cache brings positions of node's run before `end`
        that a window's layers lack."""
        return any(max(node.start, first[w]) < min(h, end) for w, h in node.held.items())

    def _fill(self, node, held, first) -> bool:
        """Take the positions of node's run that a window's layers lack and
        the cache brings."""
        better = {w for w, h in node.held.items() if max(node.start, first[w]) < h}
        if not better:
            return False
        old = node.nbytes
        self._store(node, held, first, better)
        self.bytes += node.nbytes - old
        return True

    def _split(self, node, m):
        """Cut node's run after m tokens; returns the new first part (whose
        only child is node, now holding the rest)."""
        top = _Node(node.tokens[:m], node.start, node.parent)
        top.tick = node.tick
        top.held = {w: min(top.end, h) for w, h in node.held.items()}
        rest_held = {w: max(top.end, h) for w, h in node.held.items()}
        tops, rests = [], []
        for w, (k, v) in zip(self.windows, node.kv):
            cut = max(0, top.end - node.held[w])     # positions of the first part in k
            tops += [k[:, :, :cut], v[:, :, :cut]]
            rests += [k[:, :, cut:], v[:, :, cut:]]
        tops, rests = _own_all(tops), _own_all(rests)
        top.kv = list(zip(tops[0::2], tops[1::2]))
        kv = list(zip(rests[0::2], rests[1::2]))
        top.nbytes = sum(x.nbytes for x in tops)
        rest = sum(x.nbytes for x in rests)
        self._pending.extend(x for pair in top.kv + kv for x in pair)
        self.bytes += top.nbytes + rest - node.nbytes
        node.parent.children[node.tokens[0]] = top
        node.tokens, node.start, node.parent = node.tokens[m:], top.end, top
        node.held, node.kv, node.nbytes = rest_held, kv, rest
        top.children = {node.tokens[0]: node}
        self.nodes += 1
        return top

    def flush(self):
        """Compute the copies made since the last flush (one evaluation)."""
        if self._pending:
            todo, self._pending = self._pending, []
            _eval(todo)

    # -------------------------------------------------------------- eviction --
    def _leaves(self):
        stack, out = [self.root], []
        while stack:
            node = stack.pop()
            if node.children:
                stack.extend(node.children.values())
            elif node is not self.root:
                out.append(node)
        return out

    def _evict(self):
        while self.bytes > self.budget:
            leaf = min(self._leaves(), key=lambda x: x.tick)
            self._drop(leaf)
            self.evictions += 1

    def _drop(self, node):
        del node.parent.children[node.tokens[0]]
        self.bytes -= node.nbytes
        self.nodes -= 1
        node.kv, node.parent = None, None

    def sequences(self):
        """The token sequences of the tree's leaves (for tests and debugging)."""
        out = []
        for leaf in self._leaves():
            runs, node = [], leaf
            while node is not self.root:
                runs.append(node.tokens)
                node = node.parent
            out.append(tuple(t for run in reversed(runs) for t in run))
        return out

    def clear(self):
        """Drop every node (their arrays are freed now, not at a garbage collection)."""
        stack = [self.root]
        while stack:
            node = stack.pop()
            stack.extend(node.children.values())
            node.children, node.kv, node.parent = {}, None, None
        self.root = _Node((), 0, None)
        self._pending = []
        self.bytes = 0
        self.nodes = 0
