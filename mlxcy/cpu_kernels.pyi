"""Types of mlxcy.cpu_kernels (cpu_kernels.pyx): mlxcy's own x86 CPU kernels."""
from typing import Literal

from mlxcy.core import Array

def decode_attention(q: Array, k: Array, v: Array, scale: float) -> Array:
    """softmax(scale * q k^T) v for one query position: q [B, H, 1, D], k and v [B, Hkv, T, D]."""
def set_enabled(mode: bool | None) -> bool | None:
    """None: used on the CPU (the default); True: always when supported;
    False: never.  Returns the previous setting."""
def enabled() -> bool | None: ...
def set_num_threads(n: int) -> None: ...
def num_threads() -> int: ...
def cores() -> int:
    """The cores this process may run on."""
def set_isa(name: Literal["avx2", "scalar"]) -> None: ...
def isa() -> str:
    """'avx2+fma' or 'scalar'."""
def set_int8_activations(on: bool) -> bool:
    """Returns the previous setting."""
def has_avx2() -> bool: ...
def set_gemm_min_rows(m: int) -> None: ...
def linear(
    x: Array,
    w: Array,
    scales: Array | None = None,
    biases: Array | None = None,
    group_size: int = 64,
    bits: int = 4,
    bias: Array | None = None,
) -> Array:
    """x @ W.T (+ bias) by mlxcy's CPU kernels; W quantized when `scales` is given."""
