# cython: language_level=3, cpp_locals=True
"""MLX's own distributed layer (mlx::core::distributed) from Python.

    import mlxcy.distributed as dist
    g = dist.init(backend="ring")       # under mlx.launch / mlxcy launch
    y = dist.all_sum(x)                 # every rank gets the sum

Backends are MLX's: "ring" (TCP between CPUs; the hostfile comes from the
MLX_HOSTFILE and MLX_RANK environment variables that `mlx.launch` sets),
"nccl" (CUDA), "mpi", "jaccl", or "any" (the first available).  A process
started without a launcher gets a group of size 1 unless strict=True.

The ring backend never times out by itself: a peer that never connects
blocks init() in accept(), a peer that dies mid-collective blocks the
survivors forever.  init(timeout=...) and `deadline(...)` arm a watchdog
thread (C++, no GIL needed) that prints a message naming the rank and ends
the process with exit code 75 when the deadline passes, so a launcher sees
the failure and stops the other ranks.

Also here: the two Linear layers of a tensor-parallel model (mlxcy.distributed.parallel)
-- AllSumLinear (row-parallel: o_proj and down_proj, partial products summed
over the group) and GatherLinear (the vocabulary-split head: each rank's
logits gathered into the full vocabulary).
"""
from libcpp cimport bool as cbool
from libcpp.optional cimport optional, make_optional
from libcpp.string cimport string
from libcpp.vector cimport vector

from mlxcy.core cimport Array, wrap, handle, as_dtype, Dtype as PyDtype
from mlxcy.native cimport array as na
from mlxcy.native cimport ops as nops
from mlxcy.native cimport distributed as nd
from mlxcy.native cimport nn as nnn
from mlxcy.native.array cimport heap
from mlxcy.nn cimport Linear
from mlxcy.models.base cimport Model, Block, Attention, MLP
from mlxcy.models.cache cimport LayerCache

import os


cdef extern from "mlxcy/watchdog.h" namespace "mlxcy" nogil:
    void watchdog_arm(double seconds, const string& message, int code) except +
    void watchdog_disarm() except +


EXIT_TIMEOUT = 75
BACKENDS = ("any", "ring", "nccl", "mpi", "jaccl", "jaccl-ring")


cdef class Group:
    """A group of processes (mlx::core::distributed::Group)."""
    cdef nd.Group* g

    def __dealloc__(self):
        if self.g != NULL:
            del self.g
            self.g = NULL

    @property
    def rank(self):
        return self.g.rank()

    @property
    def size(self):
        return self.g.size()

    def split(self, int color, int key=-1):
        """Processes passing the same color form one new group, ranked by key
        (negative: by the rank here).  The ring backend cannot split."""
        return _wrap_group(self.g.split(color, key))

    def __repr__(self):
        return f"<Group rank {self.rank} of {self.size}>"


cdef Group _wrap_group(nd.Group g):
    cdef Group r = Group.__new__(Group)
    r.g = new nd.Group(g)
    return r


cdef Group _WORLD = None


def is_available(backend=None):
    """Whether MLX can run `backend` (None: any backend)."""
    if backend is None:
        return nd.is_available()
    return nd.is_available(_backend(backend))


cdef string _backend(object backend) except *:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    return backend.encode()


def init(backend="any", bint strict=False, timeout=None):
    """Initialize MLX's distributed backend; returns the group of all ranks
    (cached: later calls return it).  strict: raise when no backend can be
    initialized instead of returning a size-1 group.  timeout (seconds, or
    the MLXCY_DIST_TIMEOUT environment variable, default 60): a rank whose
    peers do not connect within it ends with an error (exit code 75)."""
    global _WORLD
    if _WORLD is not None:
        return _WORLD
    cdef string bk = _backend(backend)
    cdef double t = _timeout(timeout, "MLXCY_DIST_TIMEOUT", 60.0)
    rank = os.environ.get("MLX_RANK", os.environ.get("OMPI_COMM_WORLD_RANK", "?"))
    cdef string msg = (f"mlxcy.distributed: rank {rank}: the {backend} backend did not connect "
                       f"to its peers within {t:g} s (a rank failed to start or cannot be "
                       f"reached; MLXCY_DIST_TIMEOUT sets the limit)").encode()
    cdef nd.Group* g = NULL
    if t > 0:
        watchdog_arm(t, msg, EXIT_TIMEOUT)
    try:
        with nogil:
            g = new nd.Group(nd.init(strict, bk))
    finally:
        if t > 0:
            watchdog_disarm()
    cdef Group r = Group.__new__(Group)
    r.g = g
    _WORLD = r
    return r


cdef double _timeout(object timeout, str env, double default) except? -1:
    if timeout is None:
        timeout = os.environ.get(env, default)
    try:
        t = float(timeout)
    except (TypeError, ValueError):
        raise ValueError(f"{env}/timeout must be a number of seconds, got {timeout!r}") from None
    if t < 0:
        raise ValueError(f"{env}/timeout must be >= 0 seconds (0: no limit), got {t}")
    return t


def world():
    """The group init() returned (init() with the defaults when not yet called)."""
    return _WORLD if _WORLD is not None else init()


def rank():
    return world().rank


def size():
    return world().size


class deadline:
    """with deadline(seconds, what): the process ends with an error naming
    `what` and this rank when the block does not finish in time (a peer died
    or hangs).  seconds None: MLXCY_DIST_STEP_TIMEOUT, default 60; 0: off."""

    def __init__(self, seconds=None, what="a collective operation"):
        self.t = _timeout(seconds, "MLXCY_DIST_STEP_TIMEOUT", 60.0)
        self.what = what

    def __enter__(self):
        cdef string msg
        if self.t > 0:
            r = _WORLD.rank if _WORLD is not None else "?"
            msg = (f"mlxcy.distributed: rank {r}: {self.what} did not finish within "
                   f"{self.t:g} s: another rank died or stopped responding").encode()
            watchdog_arm(self.t, msg, EXIT_TIMEOUT)
        return self

    def __exit__(self, *exc):
        if self.t > 0:
            watchdog_disarm()
        return False


cdef optional[nd.Group] _opt(object group) except *:
    cdef Group g = world() if group is None else group
    if not isinstance(g, Group):
        raise TypeError(f"group must be a distributed.Group, got {type(group).__name__}")
    return make_optional[nd.Group](g.g[0])


def all_sum(Array x, group=None):
    """The elementwise sum of x over every rank of the group."""
    cdef optional[nd.Group] g = _opt(group)
    return wrap(heap(nd.all_sum(handle(x)[0], g)))


def all_max(Array x, group=None):
    cdef optional[nd.Group] g = _opt(group)
    return wrap(heap(nd.all_max(handle(x)[0], g)))


def all_min(Array x, group=None):
    cdef optional[nd.Group] g = _opt(group)
    return wrap(heap(nd.all_min(handle(x)[0], g)))


def all_gather(Array x, group=None):
    """Every rank's x concatenated along axis 0, in rank order."""
    cdef optional[nd.Group] g = _opt(group)
    return wrap(heap(nd.all_gather(handle(x)[0], g)))


def send(Array x, int dst, group=None):
    """Send x to rank dst (the ring backend: a neighbour, rank +- 1); returns
    an array to evaluate to run the send."""
    cdef optional[nd.Group] g = _opt(group)
    return wrap(heap(nd.send(handle(x)[0], dst, g)))


def recv(shape, dtype, int src, group=None):
    """An array of `shape` and `dtype` received from rank src."""
    cdef optional[nd.Group] g = _opt(group)
    cdef na.Shape s = na.Shape()
    for d in shape:
        s.push_back(int(d))
    cdef PyDtype dt = as_dtype(dtype)
    return wrap(heap(nd.recv(s, na.dtype_from_code(dt.code), src, g)))


def recv_like(Array like, int src, group=None):
    cdef optional[nd.Group] g = _opt(group)
    return wrap(heap(nd.recv_like(handle(like)[0], src, g)))


# ------------------------------------------------ tensor-parallel layers ---

cdef class AllSumLinear(Linear):
    """A row-parallel Linear: this rank holds input columns [c0, c1) of the
    weight (and the bias on rank 0 only); forward sums the partial products
    over the group, so every rank gets the full output."""
    cdef Group group

    def set_group(self, Group group):
        self.group = group
        return self

    cdef na.array* forward(self, const na.array& x) except NULL:
        cdef na.array y = nnn.own(Linear.forward(self, x))
        return heap(nd.all_sum(y, make_optional[nd.Group](self.group.g[0])))


cdef class GatherLinear(Linear):
    """The vocabulary-split output head: this rank holds rows [r*V/N,
    (r+1)*V/N) of the head (zero rows pad the last shard); forward gathers
    every rank's logits into the full [..., vocab]."""
    cdef Group group
    cdef int vocab

    def set_group(self, Group group, int vocab):
        self.group = group
        self.vocab = vocab
        return self

    cdef na.array* forward(self, const na.array& x) except NULL:
        cdef na.array y = nnn.own(Linear.forward(self, x))
        cdef int nd_ = y.ndim()
        # all_gather concatenates along axis 0: gather with the vocabulary first
        y = nops.moveaxis(y, nd_ - 1, 0)
        y = nd.all_gather(y, make_optional[nd.Group](self.group.g[0]))
        y = nops.moveaxis(y, 0, nd_ - 1)
        cdef na.Shape start = na.Shape()
        cdef na.Shape stop = na.Shape()
        cdef int i
        if y.shape(nd_ - 1) != self.vocab:    # drop the padding rows' logits
            for i in range(nd_):
                start.push_back(0)
                stop.push_back(y.shape(i))
            stop[nd_ - 1] = self.vocab
            y = nops.slice(y, start, stop)
        return heap(y)



cdef _adopt(Linear dst, Linear src):
    """Move src's arrays into dst (no copy); src is left empty."""
    dst.weight, dst.scales, dst.qbiases, dst.bias = src.weight, src.scales, src.qbiases, src.bias
    src.weight = src.scales = src.qbiases = src.bias = NULL
    dst.in_features, dst.out_features = src.in_features, src.out_features
    dst.bits, dst.group_size, dst.quantized = src.bits, src.group_size, src.quantized


def install_tensor_parallel(Model model, Group group, Linear head, int vocab, config):
    """Turn a model built from this rank's shards (mlxcy.distributed.parallel) into its
    tensor-parallel form: each block's o_proj and down_proj become
    AllSumLinear, the output head the vocabulary-split GatherLinear `head`,
    and model.config the full model's config."""
    cdef Block b
    cdef Attention at
    cdef MLP m
    cdef AllSumLinear o
    cdef GatherLinear h
    for blk in model.layers:
        b = <Block>blk
        at, m = b.attn, b.mlp
        if at.o_proj is None or m.down_proj is None:
            raise ValueError("install_tensor_parallel: a block lacks o_proj/down_proj")
        o = AllSumLinear.__new__(AllSumLinear)
        _adopt(o, at.o_proj)
        at.o_proj = o.set_group(group)
        o = AllSumLinear.__new__(AllSumLinear)
        _adopt(o, m.down_proj)
        m.down_proj = o.set_group(group)
    h = GatherLinear.__new__(GatherLinear)
    _adopt(h, head)
    h.set_group(group, vocab)
    if model.lm_head is not None:
        model.lm_head.free()
    model.lm_head = h
    model.config = config
    return model


# ---------------------------------------------------------- pipeline layers ---

cdef class PipeBlock(Block):
    """A stage boundary of a pipeline-parallel model: the block `inner` (its
    modules shared, so caches, fusing and sizes see a normal block), with
    the hidden states received from rank `src` before it (src >= 0: the
    input x is ignored) and sent to rank `dst` after it (dst >= 0)."""
    cdef Block inner
    cdef Group group
    cdef int src, dst

    def __init__(self, Block inner, Group group, int src=-1, int dst=-1):
        Block.__init__(self, inner.attn, inner.mlp, inner.input_norm, inner.post_attn_norm,
                       inner.pre_ff_norm, inner.post_ff_norm)
        self.inner, self.group, self.src, self.dst = inner, group, src, dst

    cdef na.array* forward(self, const na.array& x, LayerCache cache, const na.array* mask,
                           const na.array* offsets) except NULL:
        # Both transfers are evaluated here, at once: a caller may evaluate
        # only part of a step's graph (the engine's prefill evaluates the
        # caches, not the logits), and a send or recv left in an unevaluated
        # graph would stall the peer or pair with the wrong message later.
        # So every forward call moves exactly one message per boundary.
        cdef optional[nd.Group] g = make_optional[nd.Group](self.group.g[0])
        cdef na.array h = x
        if self.src >= 0:
            h = nd.recv_like(x, self.src, g)
            h.eval()
        cdef na.array y = nnn.own(self.inner.forward(h, cache, mask, offsets))
        if self.dst >= 0:
            y.eval()
            nd.send(y, self.dst, g).eval()
        return heap(y)


cdef class PipeHead(Linear):
    """The output head of a pipeline: the last stage (`owner`) computes the
    logits, the other ranks contribute zeros, and one all_sum gives every
    rank the last stage's logits (x + 0 is exact)."""
    cdef Group group
    cdef int vocab
    cdef bint owner

    def set_group(self, Group group, int vocab, bint owner):
        self.group, self.vocab, self.owner = group, vocab, owner
        return self

    cdef na.array* forward(self, const na.array& x) except NULL:
        cdef na.array y = x
        cdef na.Shape s = na.Shape()
        cdef na.Shape start = na.Shape()
        cdef int i, nd_ = x.ndim()
        if self.owner:
            y = nnn.own(Linear.forward(self, x))
        else:
            # zeros [..., vocab] that still depend on x, so this stage's send runs
            for i in range(nd_):
                start.push_back(0)
                s.push_back(x.shape(i) if i < nd_ - 1 else 1)
            y = nops.multiply(nops.slice(x, start, s), nnn.scalar(0.0, x.dtype()))
            s[nd_ - 1] = self.vocab
            y = nnn.broadcast_to(y, s)
        return heap(nd.all_sum(y, make_optional[nd.Group](self.group.g[0])))

    cpdef long long nparams(self):
        return Linear.nparams(self) if self.owner else 0

    cpdef long long nbytes(self):
        return Linear.nbytes(self) if self.owner else 0


def install_pipeline(Model model, Group group, list owned, Linear head, int vocab, config):
    """Turn a model built from this rank's layers into its pipeline stage:
    the first block receives from the previous rank, the last sends to the
    next, and the head is the last stage's (PipeHead)."""
    cdef int r = group.rank, n = group.size
    if not model.layers:
        raise ValueError("pipeline parallel: this rank has no layers")
    if n > 1 and r > 0 and r < n - 1 and len(model.layers) == 1:
        model.layers[0] = PipeBlock(<Block>model.layers[0], group, r - 1, r + 1)
    else:
        if r > 0:
            model.layers[0] = PipeBlock(<Block>model.layers[0], group, r - 1, -1)
        if r < n - 1:
            last = model.layers[len(model.layers) - 1]
            if isinstance(last, PipeBlock):
                (<PipeBlock>last).dst = r + 1
            else:
                model.layers[len(model.layers) - 1] = PipeBlock(<Block>last, group, -1, r + 1)
    cdef PipeHead h = PipeHead.__new__(PipeHead)
    if head is not None:
        _adopt(h, head)
    h.set_group(group, vocab, r == n - 1)
    if model.lm_head is not None:
        model.lm_head.free()
    model.lm_head = h
    model.config = config
    return model
