# Declarations mirroring mlx/memory.h.
cdef extern from "mlx/memory.h" namespace "mlx::core" nogil:
    size_t get_active_memory() except +
    size_t get_peak_memory() except +
    void reset_peak_memory() except +
    size_t get_cache_memory() except +
    size_t set_memory_limit(size_t) except +
    size_t get_memory_limit() except +
    size_t set_cache_limit(size_t) except +
    size_t set_wired_limit(size_t) except +
    void clear_cache() except +
