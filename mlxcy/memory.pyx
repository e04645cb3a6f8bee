# cython: language_level=3, cpp_locals=True
"""MLX's memory accounting and limits (all sizes in bytes).

Active memory is what live arrays hold; freed buffers go to a cache that MLX
reuses before asking the system for more (clear_cache() returns it).

Note: on CPU, MLX 0.32 treats the memory limit as a guideline only and does
not check for failed allocations -- an allocation larger than the machine's
memory crashes its worker thread.  mlxcy.eval() refuses outputs larger than
physical memory up front, but cannot see intermediates.
"""
from mlxcy.native cimport memory as nm

cdef extern from "mlxcy/heap.h" namespace "mlxcy" nogil:
    bint _trim_heap "mlxcy::trim_heap"()

__all__ = ["get_active_memory", "get_peak_memory", "reset_peak_memory",
           "get_cache_memory", "set_memory_limit", "get_memory_limit",
           "set_cache_limit", "set_wired_limit", "clear_cache", "trim_heap"]


cdef size_t _size(object n, str fn) except? 0:
    if not isinstance(n, int) or isinstance(n, bool):
        raise TypeError(f"{fn}: limit must be an int number of bytes, not {type(n).__name__}")
    if n < 0:
        raise ValueError(f"{fn}: limit must be >= 0, not {n}")
    return n


def get_active_memory():
    """Bytes held by live arrays (not counting the cache)."""
    return nm.get_active_memory()


def get_peak_memory():
    """Most active memory seen since start or reset_peak_memory()."""
    return nm.get_peak_memory()


def reset_peak_memory():
    """Restart peak tracking from zero."""
    nm.reset_peak_memory()


def get_cache_memory():
    """Bytes kept in MLX's buffer cache for reuse."""
    return nm.get_cache_memory()


def set_memory_limit(limit):
    """Set the memory limit (a guideline for graph evaluation); returns the
    previous limit."""
    return nm.set_memory_limit(_size(limit, "set_memory_limit"))


def get_memory_limit():
    """The current memory limit."""
    return nm.get_memory_limit()


def set_cache_limit(limit):
    """Cap the buffer cache (0 disables caching); returns the previous cap."""
    return nm.set_cache_limit(_size(limit, "set_cache_limit"))


def set_wired_limit(limit):
    """Set the wired (resident) memory limit -- meaningful only with Metal on
    macOS 15+; returns the previous limit."""
    return nm.set_wired_limit(_size(limit, "set_wired_limit"))


def clear_cache():
    """Return cached buffers to the system."""
    nm.clear_cache()


def trim_heap():
    """Give the C heap's free pages back to the system (glibc's
    ``malloc_trim(0)``); returns whether any were.

    MLX's CPU buffers live on the C heap.  When their shapes keep changing (a
    server's batches and caches), freed buffers leave free chunks between live
    ones that glibc keeps: the resident size grows while the memory in use
    does not.  This returns those pages; it walks the free lists (a few ms for
    hundreds of MB) and the pages fault back in when used again, so call it
    now and then, not per step.  A no-op returning False where the C library
    has no malloc_trim (macOS, musl).  Call clear_cache() first to include
    MLX's cached buffers."""
    cdef bint r
    with nogil:
        r = _trim_heap()
    return r
