"""Types of mlxcy.distributed.comm (comm.pyx): MLX's distributed groups and
collectives, and the layers of tensor- and pipeline-parallel models."""
from collections.abc import Sequence
from types import TracebackType
from typing import Literal

from typing_extensions import Self, disjoint_base

from mlxcy.core import Array, _DtypeLike
from mlxcy.models.base import Block, Model
from mlxcy.models.config import ModelConfig
from mlxcy.nn import Linear

EXIT_TIMEOUT: int
BACKENDS: tuple[str, ...]

_Backend = Literal["any", "ring", "nccl", "mpi", "jaccl", "jaccl-ring"]

@disjoint_base
class Group:
    """A group of processes (mlx::core::distributed::Group)."""

    @property
    def rank(self) -> int: ...
    @property
    def size(self) -> int: ...
    def split(self, color: int, key: int = -1) -> Group:
        """Processes passing the same color form one new group, ranked by key."""

def is_available(backend: _Backend | None = None) -> bool: ...
def init(backend: _Backend = "any", strict: bool = False, timeout: float | None = None) -> Group:
    """Initialize MLX's distributed backend; returns the group of all ranks."""
def world() -> Group:
    """The group init() returned (init() with the defaults when not yet called)."""
def rank() -> int: ...
def size() -> int: ...

class deadline:
    """with deadline(seconds, what): the process ends with an error naming
    `what` and this rank when the block does not finish in time."""

    t: float
    what: str
    def __init__(self, seconds: float | None = None, what: str = "a collective operation") -> None: ...
    def __enter__(self) -> Self: ...
    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> Literal[False]: ...

def all_sum(x: Array, group: Group | None = None) -> Array: ...
def all_max(x: Array, group: Group | None = None) -> Array: ...
def all_min(x: Array, group: Group | None = None) -> Array: ...
def all_gather(x: Array, group: Group | None = None) -> Array:
    """Every rank's x concatenated along axis 0, in rank order."""
def send(x: Array, dst: int, group: Group | None = None) -> Array:
    """Send x to rank dst; returns an array to evaluate to run the send."""
def recv(shape: Sequence[int], dtype: _DtypeLike, src: int, group: Group | None = None) -> Array: ...
def recv_like(like: Array, src: int, group: Group | None = None) -> Array: ...

@disjoint_base
class AllSumLinear(Linear):
    """A row-parallel Linear whose forward sums the partial products over the group."""

    def set_group(self, group: Group) -> Self: ...

@disjoint_base
class GatherLinear(Linear):
    """The vocabulary-split output head; forward gathers every rank's logits."""

    def set_group(self, group: Group, vocab: int) -> Self: ...

@disjoint_base
class PipeBlock(Block):
    """A stage boundary of a pipeline-parallel model (receives from `src`,
    sends to `dst`)."""

    def __init__(self, inner: Block, group: Group, src: int = -1, dst: int = -1) -> None: ...

@disjoint_base
class PipeHead(Linear):
    """The output head of a pipeline: the last stage (`owner`) computes the logits."""

    def set_group(self, group: Group, vocab: int, owner: bool) -> Self: ...

def install_tensor_parallel(model: Model, group: Group, head: Linear, vocab: int, config: ModelConfig) -> Model: ...
def install_pipeline(model: Model, group: Group, owned: list[int], head: Linear, vocab: int, config: ModelConfig) -> Model: ...
