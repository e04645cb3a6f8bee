"""Types of mlxcy.models.base (base.pyx): the decoder shared by the model
families (RoPE, attention, MLP, block, Model) and the weight loader."""
from collections.abc import Mapping, Sequence
from types import TracebackType
from typing import Any, Literal

from typing_extensions import Self, disjoint_base

from mlxcy.core import Array, Dtype, _ArrayLike, _DtypeLike
from mlxcy.models.cache import Cache
from mlxcy.models.config import ModelConfig
from mlxcy.models.spec import ArchSpec, Module
from mlxcy.nn import Embedding, Linear, RMSNorm

@disjoint_base
class Rope:
    """Rotary embedding (non-traditional layout, as in HF checkpoints)."""

    def __init__(
        self, dims: int, theta: float, scaling: Mapping[str, Any] | None = None, max_position_embeddings: int = 0
    ) -> None: ...
    def free(self) -> None: ...

@disjoint_base
class Attention:
    def __init__(
        self,
        q_proj: Linear,
        k_proj: Linear,
        v_proj: Linear,
        o_proj: Linear,
        rope: Rope,
        n_heads: int,
        n_kv_heads: int,
        head_dim: int,
        scale: float,
        q_norm: RMSNorm | None = None,
        k_norm: RMSNorm | None = None,
        window: int = 0,
        softcap: float = 0,
    ) -> None: ...
    def free(self) -> None: ...

@disjoint_base
class MLP:
    def __init__(self, gate_proj: Linear, up_proj: Linear, down_proj: Linear, gelu: bool = False) -> None: ...
    def free(self) -> None: ...

@disjoint_base
class Block:
    """Pre-norm block: h = x + attn(norm(x)); out = h + mlp(norm(h))."""

    def __init__(
        self,
        attn: Attention,
        mlp: MLP,
        input_norm: RMSNorm,
        post_attn_norm: RMSNorm,
        pre_ff_norm: RMSNorm | None = None,
        post_ff_norm: RMSNorm | None = None,
    ) -> None: ...
    def parts(self) -> list[Linear | RMSNorm]:
        """Every weight-holding layer of the block (fused or not)."""
    def nparams(self) -> int: ...
    def nbytes(self) -> int: ...
    def fuse(self) -> None:
        """Concatenate q/k/v and gate/up weights (fewer matmuls per token)."""
    def free(self) -> None: ...

def fuse_linears(parts: list[Linear]) -> Linear | None:
    """One Linear whose output is the parts' outputs side by side, or None."""

class Weights:
    """Hugging Face-named weights with MLX's quantized layout: hands out
    validated layers and names the tensor in every error."""

    w: dict[str, Any]
    q: dict[str, Any] | None
    dtype: Dtype | None
    def __init__(
        self,
        weights: dict[str, Any],
        quantization: dict[str, Any] | None = None,
        dtype: _DtypeLike | None = None,
        spec: ArchSpec | None = None,
    ) -> None: ...
    def has(self, name: str) -> bool: ...
    def get(self, name: str, shape: Sequence[int] | None = None, floating: bool = True) -> Array: ...
    def qspec(self, path: str) -> tuple[int, int] | None:
        """(group_size, bits) when `path` is stored quantized, else None."""
    def linear(self, path: str, in_f: int, out_f: int, bias: bool = False) -> Linear: ...
    def embedding(self, path: str, vocab: int, dims: int) -> Embedding: ...
    def norm(self, path: str, dims: int, eps: float, offset: float = 0.0) -> RMSNorm: ...
    def module(self, m: Module, eps: float = 0.0) -> Linear | Embedding | RMSNorm:
        """The layer a spec Module (mlxcy/models/spec.py) describes."""

def set_gpu_decode_step(on: bool) -> bool:
    """Use the one-kernel decode step on CUDA GPUs where it applies (default
    True); returns the previous setting."""

def set_gpu_verify_step(on: bool) -> bool:
    """Run steps of several positions of one sequence (a speculative step's
    proposals, up to gpu_step.h's step_max_positions) as one kernel too, where
    the one-kernel step applies (default True); returns the previous setting."""

def set_gpu_rows_step(on: bool) -> bool:
    """Run a batch's one-token steps (one new token in each of its rows,
    left-padded or not) as the one-kernel step too, where it applies
    (default True); returns the previous setting."""

def set_gpu_launch_rows(rows: int) -> int:
    """At most `rows` rows of a batch in one launch of the one-kernel step (0,
    the default: as many as shared memory takes, up to 64); a larger batch
    runs as several launches.  For tests and measurements; returns the
    previous setting."""

def set_gpu_step_split(mode: bool | int | None) -> bool | int | None:
    """How the one-token kernel runs a layer's MLP: None (default) split over
    slices of its hidden rows, one grid-wide barrier fewer, where there are
    enough slices to keep the GPU busy; True wherever the slices are whole;
    False never; 2, 4 or 8: slices of that many 16-byte chunks of each down
    row wherever they are whole (tests; by default the kernel chooses).
    Returns the previous setting."""

def gpu_step_slice(m: Model, blocks: int) -> int | None:
    """The one-token kernel's MLP split for m on a grid of `blocks` (one per
    SM), as the setting above chooses it: 0 (not split) or the 16-byte chunks
    of each down row a slice takes; None where the kernel would not run m.
    Host arithmetic only, on any device (tests)."""

def gpu_decode_steps() -> int:
    """How many decode steps have run as the one-kernel GPU step (tests and
    benchmarks check that the path was taken)."""

def gpu_verify_positions(m: Model) -> int:
    """The most positions of one sequence the one-kernel step verifies at
    once for m on this device, or 0 where that kernel does not run m."""

def gpu_rows_kernel(m: Model) -> bool:
    """Whether a batch's one-token steps run as the one-kernel step for m on
    this device; the engine then proposes nothing for a batch's rows."""

def step_table_per_layer() -> int:
    """Entries per layer in the one-kernel step's pointer table (gpu_step.h)."""
def gpu_step_plan(m: Model, cache: Cache, positions: int = 1, rows: int = 1) -> dict[str, Any] | None:
    """What the one-kernel GPU step would be given for a step of `positions`
    tokens over cache (or of one token in each of a batch's `rows` rows), on
    any device (tests): None where it would not run, else gemma, embed_scale,
    inv_freq, entries, offset and caps."""
def gpu_step_timing(m: Model) -> Any:
    """The clock readings of m's last one-kernel decode step (numpy uint32,
    [2 + 2 * barriers, blocks]: each block's start, arrival at and release
    from every barrier, and end; gpu_step.h's clock_mark), or None.  Recorded
    only when MLXCY_STEP_TIMING=1 was in the environment at the first step
    (benchmarks/gpu_step_profile.py --phases)."""

def make_rope(cfg: ModelConfig, theta: float, scaling: Mapping[str, Any] | None) -> Rope: ...
def build_attention(
    W: Weights,
    cfg: ModelConfig,
    m: dict[str, Module],
    scale: float | None = None,
    window: int = 0,
    softcap: float = 0.0,
    rope: Rope | None = None,
) -> Attention: ...
def build_mlp(W: Weights, m: dict[str, Module], gelu: bool = False) -> MLP: ...

@disjoint_base
class Model:
    """A decoder-only language model over native MLX arrays.

    model(ids, cache=None, mask=None, offsets=None, last_only=False) -> logits
    Array [B, L, vocab] (L = 1 with last_only)."""

    def __init__(
        self,
        config: ModelConfig | dict[str, Any],
        weights: dict[str, Any],
        quantization: dict[str, Any] | None = None,
        dtype: _DtypeLike | None = None,
    ) -> None: ...
    @property
    def config(self) -> ModelConfig: ...
    def __call__(
        self,
        ids: _ArrayLike,
        cache: Cache | None = None,
        mask: _ArrayLike | None = None,
        offsets: _ArrayLike | None = None,
        last_only: bool = False,
    ) -> Array:
        """Logits [B, L, vocab] for token ids [B, L] or [L] (an Array of ids is
        read back to check it against the vocabulary, which waits for it)."""
    def step_form(self) -> tuple[bool, float] | None:
        """What the one-kernel GPU step must know of this class's forward:
        (gemma, the embedding's factor), or None when it does not run it."""
    def build_block(self, W: Weights, cfg: ModelConfig, i: int) -> Block: ...
    def fuse(self) -> Self:
        """Fuse each block's q/k/v and gate/up weights (inference only); returns the model."""
    def close(self) -> None:
        """Free every weight now; later calls raise."""
    @property
    def closed(self) -> bool: ...
    def __enter__(self) -> Self: ...
    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> Literal[False]: ...
    def make_cache(self, max_size: int | None = None) -> Cache:
        """One cache per layer (rotating ones for sliding-window layers)."""
    def nparams(self) -> int: ...
    def nbytes(self) -> int: ...
    @property
    def dtype(self) -> Dtype: ...
    def info(self) -> dict[str, Any]:
        """Architecture, sizes, dtype, quantization, parameter count and bytes."""
