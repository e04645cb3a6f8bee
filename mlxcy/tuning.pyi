"""Types of mlxcy.tuning (tuning.pyx): the process-wide tuning knobs."""
from contextlib import _GeneratorContextManager
from typing import Any, NamedTuple

__all__ = ["Options", "DEFAULTS", "get", "set", "override", "reset"]

class Options(NamedTuple):
    """A snapshot of mlxcy's tuning knobs (see mlxcy.tuning)."""

    cpu_sync: bool
    cache_pad: int
    prefill_split: bool | None
    prefill_chunk_cpu: int
    prefill_chunk_gpu: int
    lookup_chain: bool
    lookup_adapt: bool | None

DEFAULTS: Options

def get() -> Options: ...
def set(
    *,
    cpu_sync: bool = ...,
    cache_pad: int = ...,
    prefill_split: bool | None = ...,
    prefill_chunk_cpu: int = ...,
    prefill_chunk_gpu: int = ...,
    lookup_chain: bool = ...,
    lookup_adapt: bool | None = ...,
) -> dict[str, Any]:
    """Set the given options; returns their previous values (set(**old) restores them)."""
def override(
    *,
    cpu_sync: bool = ...,
    cache_pad: int = ...,
    prefill_split: bool | None = ...,
    prefill_chunk_cpu: int = ...,
    prefill_chunk_gpu: int = ...,
    lookup_chain: bool = ...,
    lookup_adapt: bool | None = ...,
) -> _GeneratorContextManager[Options]:
    """with override(cache_pad=0): ... -- the options set inside the block only."""
def reset() -> None: ...
