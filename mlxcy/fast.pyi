"""Types of mlxcy.fast (fast.pyx): fused kernels (norms, RoPE, attention, gemv)."""
from typing import Literal

from mlxcy.core import Array, _ArrayLike

def rms_norm(x: _ArrayLike, weight: _ArrayLike | None, eps: float = 1e-05) -> Array:
    """x / sqrt(mean(x**2, axis=-1) + eps) * weight, over the last axis."""
def layer_norm(x: _ArrayLike, weight: _ArrayLike | None, bias: _ArrayLike | None, eps: float = 1e-05) -> Array: ...
def rope(
    x: _ArrayLike,
    dims: int,
    *,
    traditional: bool,
    base: float | None,
    scale: float,
    offset: int | _ArrayLike,
    freqs: _ArrayLike | None = None,
) -> Array:
    """Rotary position embedding of the first `dims` features of x's last axis
    (give exactly one of base and freqs)."""
def scaled_dot_product_attention(
    q: _ArrayLike,
    k: _ArrayLike,
    v: _ArrayLike,
    *,
    scale: float,
    mask: Literal["causal"] | _ArrayLike | None = None,
    sinks: _ArrayLike | None = None,
) -> Array:
    """softmax(q @ k^T * scale + mask) @ v."""
def gemv(
    x: _ArrayLike,
    w: _ArrayLike,
    *,
    scales: _ArrayLike | None = None,
    biases: _ArrayLike | None = None,
    bits: int = 0,
    group_size: int = 64,
    bias: _ArrayLike | None = None,
    norm_weight: _ArrayLike | None = None,
    eps: float = 1e-05,
    residual: _ArrayLike | None = None,
    act: Literal["silu", "gelu_tanh"] | None = None,
) -> Array:
    """One decode-time matrix-vector product as mlxcy's own CUDA kernel."""
def gemv_unsupported_reason(
    x: _ArrayLike,
    w: _ArrayLike,
    *,
    scales: _ArrayLike | None = None,
    biases: _ArrayLike | None = None,
    bits: int = 0,
    group_size: int = 64,
    bias: _ArrayLike | None = None,
    norm_weight: _ArrayLike | None = None,
    eps: float = 1e-05,
    residual: _ArrayLike | None = None,
    act: Literal["silu", "gelu_tanh"] | None = None,
) -> str | None:
    """None when gemv(...) with these arguments runs its CUDA kernel, else why not."""
def set_gemv_max_rows(rows: int) -> int:
    """Most activation rows the decode kernels take; returns the previous value."""
