"""Types of mlxcy.cpu_kernels (cpu_kernels.pyx): mlxcy's own x86 CPU kernels."""
from typing import Literal, Sequence

from mlxcy.core import Array

# A layer's operands for the block primitives: (weight, scales, biases, bias,
# group_size, bits), None for what is absent.
_Layer = tuple[Array, Array | None, Array | None, Array | None, int, int]

def block_qkv(
    x: Array,
    norm_w: Array,
    eps: float,
    parts: Sequence[_Layer],
    H: int,
    Hkv: int,
    D: int,
    rope_dims: int,
    rope_base: float = 10000.0,
    rope_scale: float = 1.0,
    freqs: Array | None = None,
    q_norm: Array | None = None,
    k_norm: Array | None = None,
    qk_eps: float = 1e-6,
    offset: int = 0,
    offsets: Array | None = None,
) -> tuple[Array, Array, Array]:
    """RMSNorm -> q/k/v -> (q/k norm) -> RoPE of one decode step as one primitive (row b at offsets[b] when given)."""
def block_attn_mlp(
    q: Array,
    k: Array,
    v: Array,
    x: Array,
    attn_scale: float,
    o: _Layer,
    norm_mid: Array,
    eps: float,
    gate_up: Sequence[_Layer],
    down: _Layer,
    act: Literal["silu", "gelu_tanh"] = "silu",
    norm_o: Array | None = None,
    norm_mlp: Array | None = None,
    mask: Array | None = None,
) -> Array:
    """Attention (with an optional mask) -> o_proj -> residual -> RMSNorm -> gate/up -> act -> down -> residual."""
def set_block_fusion(on: bool) -> bool:
    """Fused block primitives for one-token CPU steps (on by default).  Returns the previous setting."""

def attention(q: Array, k: Array, v: Array, scale: float, causal: bool = False, mask: Array | None = None) -> Array:
    """softmax(scale * q k^T (+ mask)) v: q [B, H, L, D], k and v [B, Hkv, T, D], L <= T; causal: query i sees keys up to T - L + i; mask: boolean or additive, broadcast to [B, H, L, T]."""
def activation(g: Array, u: Array, act: Literal["silu", "gelu_tanh"] = "silu") -> Array:
    """act(g) * u (the MLP's SwiGLU / GeGLU product): g and u of one shape and float dtype."""
def set_enabled(mode: bool | None) -> bool | None:
    """None: used on the CPU (the default); True: always when supported;
    False: never.  Returns the previous setting."""
def enabled() -> bool | None: ...
def set_num_threads(n: int) -> None: ...
def num_threads() -> int: ...
def cores() -> int:
    """The cores this process may run on."""
ISAS: tuple[str, ...]

def set_isa(name: Literal["avx512vnni", "avx2", "scalar"]) -> None:
    """The most the kernels may use ('avx512vnni' by default); the CPU's limits apply on top."""
def isa() -> str:
    """'avx512vnni', 'avx2+fma' or 'scalar'."""
ACTIVATIONS: tuple[str, ...]

def set_activations(mode: str) -> str:
    """'int16' (default), 'float32' or 'int8'; returns the previous mode."""
def activations() -> str: ...
def has_avx2() -> bool: ...
def has_vnni() -> bool: ...
def int16_max_rows() -> int:
    """Products of at most this many rows of x with 4-, 5- or 8-bit weights take the int16
    kernels in one pass (int16 mode; AVX2: 11, AVX-512 VNNI: 16); larger ones the float GEMM,
    unless they are a step (see step_positions)."""
def step_positions() -> int:
    """Products over at most this many positions per sequence (16) take the int16 kernels
    at any number of rows, each row equal to its one-row product."""

def set_gemm_min_rows(m: int) -> None: ...
def set_gemm_run_bytes(n: int) -> int: ...
def set_rows_tile_bytes(n: int) -> int: ...
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
