# cython: language_level=3
"""mlxcy's tuning knobs: one process-wide set of options with measured
defaults, for benchmarks (A/B runs) and for users with unusual constraints.

    import mlxcy
    mlxcy.tuning.get()                          # Options(cpu_sync=True, cache_pad=8, ...)
    with mlxcy.tuning.override(cache_pad=0):    # restored when the block ends
        ...
    old = mlxcy.tuning.set(prefill_chunk_gpu=128)   # returns {"prefill_chunk_gpu": 512}
    mlxcy.tuning.reset()                        # every knob back to its default

The knobs (defaults in brackets):

cpu_sync [True]
    Inference with a quantized model on the CPU evaluates the hidden state
    after every block and the vocabulary head block by block.  There each
    quantized layer dequantizes its weight for MLX's float GEMM, and MLX's CPU
    backend allocates an op's output when the host encodes it, ahead of the
    worker that computes it, so without this the dequantized weights of every
    encoded layer are alive at once (SmolLM2-135M 4-bit: 33 MB above the
    resident memory instead of 131, and decode is not slower).  No effect on
    a GPU or for float weights.
cache_pad [8]
    Spare positions every newly allocated KV-cache buffer holds beyond its
    need.  MLX's CUDA backend attends a one-token query over a cache slice with
    cuDNN when the buffer's length is a multiple of 256 and with its own
    single-kernel vector attention otherwise; decode is bound by the host's
    work of encoding kernels, and cuDNN's path costs more of it (H200: 14-38%
    more tokens/s with the pad).  0 gives unpadded buffers; the logits are the
    same either way.  Caches already allocated keep theirs.
prefill_split [None]
    None: automatic -- on the CPU the prompt tokens before the last only fill
    the cache (the last layer's attention output, MLP and head are skipped for
    them) and the last token runs alone; on a GPU each chunk runs whole and
    its output is evaluated (the extra one-token pass costs a step of kernel
    launches there).  True / False force one or the other.
prefill_chunk_cpu [128], prefill_chunk_gpu [512]
    Prompt tokens per prefill step when the caller gives no prefill_chunk.
    MLX's CPU attention computes the whole [L, K] score matrix and masks it,
    so smaller chunks skip most of the masked triangle; a GPU wants large
    chunks (fewer launches).  A smaller GPU chunk lowers the prefill's peak
    memory at some prefill speed.
lookup_chain [False]
    Prompt lookup of one greedy sequence: True queues each verification step
    before the previous one is read (its proposals assume that one keeps all
    of its own), so the device does not wait while the host reads, compares
    and looks up; a chained step after a rejection is computed for nothing.
    On the CPU that costs more than it saves; on an H100 it sped up a
    copy-heavy prompt and slowed a greedy one that copies little
    (docs/benchmarks.md), so it is off until measured better.  The tokens are
    the same either way.
lookup_adapt [None]
    Prompt lookup: True -- a row's proposal length adapts to what it accepts
    (it starts at 2 tokens, doubles after a full acceptance and falls to what
    was accepted + 1), since each verified position costs its multiply-adds;
    False -- every proposal is as long as the lookup gives, up to the row's
    length, since verified positions cost nearly nothing (the GPU kernel: 13
    positions took 1.9 ms against 1.6 for 2, docs/benchmarks.md).  None:
    False where the GPU kernel verifies the model's positions
    (base.gpu_verify_positions), else True.  Where lengths do not adapt, a
    sampled row proposes only on a match of 4 ids or more (a copy under way).
    The tokens are the same either way.

The options are process-wide, like MLX's own settings: override() is not
local to a thread.  Bad names or values raise mlxcy.OptionError /
mlxcy.OptionTypeError naming the option.
"""
from collections import namedtuple
from contextlib import contextmanager

from mlxcy.errors import OptionError, OptionTypeError

__all__ = ["Options", "DEFAULTS", "get", "set", "override", "reset"]

Options = namedtuple("Options", ["cpu_sync", "cache_pad", "prefill_split",
                                 "prefill_chunk_cpu", "prefill_chunk_gpu", "lookup_chain",
                                 "lookup_adapt"])
Options.__doc__ = "A snapshot of mlxcy's tuning knobs (see mlxcy.tuning)."

DEFAULTS = Options(cpu_sync=True, cache_pad=8, prefill_split=None,
                   prefill_chunk_cpu=128, prefill_chunk_gpu=512, lookup_chain=False,
                   lookup_adapt=None)

cdef Tuning _current


cdef Tuning* current() noexcept nogil:
    return &_current


def _bool(name, value):
    if not isinstance(value, bool):
        raise OptionTypeError(f"tuning option {name!r} must be a bool, got {value!r}")
    return value


def _int(name, value, int low):
    if isinstance(value, bool) or not isinstance(value, int):
        raise OptionTypeError(f"tuning option {name!r} must be an int, got {value!r}")
    if value < low or value > 1 << 30:
        raise OptionError(f"tuning option {name!r} must be in [{low}, 2**30], got {value}")
    return value


def _auto_bool(name, value):
    if value is not None and not isinstance(value, bool):
        raise OptionTypeError(f"tuning option {name!r} must be None (automatic) or a bool, "
                              f"got {value!r}")
    return value


_CHECKS = {
    "cpu_sync": _bool,
    "cache_pad": lambda n, v: _int(n, v, 0),
    "prefill_split": _auto_bool,
    "prefill_chunk_cpu": lambda n, v: _int(n, v, 1),
    "prefill_chunk_gpu": lambda n, v: _int(n, v, 1),
    "lookup_chain": _bool,
    "lookup_adapt": _auto_bool,
}


def get():
    """The current options, as an Options snapshot (a namedtuple)."""
    return Options(
        cpu_sync=bool(_current.cpu_sync),
        cache_pad=_current.cache_pad,
        prefill_split=None if _current.prefill_split < 0 else bool(_current.prefill_split),
        prefill_chunk_cpu=_current.prefill_chunk_cpu,
        prefill_chunk_gpu=_current.prefill_chunk_gpu,
        lookup_chain=bool(_current.lookup_chain),
        lookup_adapt=None if _current.lookup_adapt < 0 else bool(_current.lookup_adapt),
    )


def set(**options):
    """Set the given options (all are checked before any is changed); returns
    their previous values as a dict, which set(**old) restores."""
    for name, value in options.items():
        check = _CHECKS.get(name)
        if check is None:
            raise OptionError(f"unknown tuning option {name!r}; the options are "
                              f"{', '.join(Options._fields)}")
        check(name, value)
    now = get()
    old = {name: getattr(now, name) for name in options}
    for name, value in options.items():
        if name == "cpu_sync":
            _current.cpu_sync = value
        elif name == "cache_pad":
            _current.cache_pad = value
        elif name == "prefill_split":
            _current.prefill_split = -1 if value is None else int(value)
        elif name == "prefill_chunk_cpu":
            _current.prefill_chunk_cpu = value
        elif name == "prefill_chunk_gpu":
            _current.prefill_chunk_gpu = value
        elif name == "lookup_chain":
            _current.lookup_chain = value
        elif name == "lookup_adapt":
            _current.lookup_adapt = -1 if value is None else int(value)
    return old


@contextmanager
def override(**options):
    """with override(cache_pad=0): ...  -- the options set inside the block,
    their previous values restored after it (also when it raises)."""
    old = set(**options)
    try:
        yield get()
    finally:
        set(**old)


def reset():
    """Every option back to its default (DEFAULTS)."""
    set(**DEFAULTS._asdict())


reset()
