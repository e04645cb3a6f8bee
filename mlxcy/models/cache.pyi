"""Types of mlxcy.models.cache (cache.pyx): the KV caches."""
from collections.abc import Iterable
from types import TracebackType
from typing import Any, Literal, overload

from typing_extensions import disjoint_base

from mlxcy.core import Array

KV_BITS: tuple[int, ...]
KV_GROUP_SIZES: tuple[int, ...]

@disjoint_base
class LayerCache:
    """Base of the layer caches (not used directly)."""

    @property
    def offset(self) -> int:
        """Positions seen so far."""
    @property
    def window(self) -> int:
        """0 for an unbounded cache; W: keeps the last W positions."""
    @property
    def step(self) -> int: ...
    def free(self) -> None:
        """Drop every held array; the cache is empty afterwards (offset 0)."""
    def trim(self, n: int) -> int:
        """Forget the last n positions; returns how many."""
    def nbytes(self) -> int: ...
    def state(self) -> dict[str, Any]:
        """{"keys": Array or None, "values": ..., "offset": int, "filled": int, "idx": int}."""
    def update_and_fetch(self, keys: Array, values: Array, ordered: bool = True) -> tuple[Array, Array]:
        """Append L new positions ([B, heads, L, head_dim]) and return the
        (keys, values) to attend over."""
    def set_state(self, keys: Array | None, values: Array | None, offset: int, filled: int = 0, idx: int = 0) -> None:
        """Restore what state() returned."""

class KVCache(LayerCache):
    """Keys/values of every position, preallocated `step` positions at a time."""

    def __init__(self, step: int = 256) -> None: ...

@disjoint_base
class QuantizedKVCache(KVCache):
    """A KVCache whose buffers hold MLX's affine quantization of the keys and values."""

    def __init__(self, bits: int = 8, group_size: int = 64, step: int = 256) -> None: ...
    @property
    def bits(self) -> int: ...
    @property
    def group_size(self) -> int: ...
    def dequantized(self) -> tuple[Array, Array] | None:
        """(keys, values) of the held positions, dequantized: [B, H, offset, D]."""

@disjoint_base
class RotatingKVCache(LayerCache):
    """Keeps the last `window` positions in a ring written in place."""

    def __init__(self, window: int, step: int = 256) -> None: ...

@disjoint_base
class Cache:
    """The KV caches of one model, one per layer (model.make_cache())."""

    def __init__(self, layers: Iterable[LayerCache]) -> None: ...
    def __len__(self) -> int: ...
    @overload
    def __getitem__(self, i: int, /) -> LayerCache: ...
    @overload
    def __getitem__(self, i: slice, /) -> list[LayerCache]: ...
    @property
    def layers(self) -> list[LayerCache]: ...
    @property
    def offset(self) -> int: ...
    @property
    def nbytes(self) -> int: ...
    def trim(self, n: int) -> int:
        """Forget the last n positions of every layer; returns how many."""
    def free(self) -> None: ...
    def __enter__(self) -> Cache: ...
    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> Literal[False]: ...

def check_kv_options(kv_bits: int | None, kv_group_size: int = 64) -> None:
    """Raise ValueError naming the option unless MLX's quantization supports them."""
def empty_like(cache: Cache) -> Cache:
    """An empty cache with the same kind of layer caches as `cache`."""
def kv_quantization(cache: Cache) -> tuple[int, int] | None:
    """(bits, group_size) of the cache's quantized layers, or None."""
def quantized_cache(cache: Cache, kv_bits: int | None, kv_group_size: int = 64) -> Cache:
    """`cache` with its unbounded layers made QuantizedKVCache(kv_bits, kv_group_size)."""
