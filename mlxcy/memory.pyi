"""Types of mlxcy.memory (memory.pyx): MLX's allocator figures and limits (bytes)."""

__all__ = ["get_active_memory", "get_peak_memory", "reset_peak_memory",
           "get_cache_memory", "set_memory_limit", "get_memory_limit",
           "set_cache_limit", "set_wired_limit", "clear_cache", "trim_heap"]

def get_active_memory() -> int: ...
def get_peak_memory() -> int: ...
def reset_peak_memory() -> None: ...
def get_cache_memory() -> int: ...
def set_memory_limit(limit: int) -> int:
    """Set the memory limit; returns the previous limit."""
def get_memory_limit() -> int: ...
def set_cache_limit(limit: int) -> int:
    """Cap the buffer cache (0 disables caching); returns the previous cap."""
def set_wired_limit(limit: int) -> int:
    """Set the wired memory limit (Metal only); returns the previous limit."""
def clear_cache() -> None: ...
def trim_heap() -> bool:
    """Give the C heap's free pages back to the system (glibc malloc_trim);
    returns whether any were (False where the C library has none)."""
