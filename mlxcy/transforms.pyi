"""Types of mlxcy.transforms (transforms.pyx): evaluation, autodiff, vmap, compile."""
from collections.abc import Callable, Sequence
from typing import Any, Generic, ParamSpec, TypeVar, final

from mlxcy.core import Array, _ArrayLike

__all__ = ["eval", "async_eval", "grad", "value_and_grad", "vjp", "jvp", "vmap",
           "checkpoint", "compile", "stop_gradient", "disable_compile",
           "enable_compile", "CompiledFunction"]

_P = ParamSpec("_P")
_R = TypeVar("_R")
_F = TypeVar("_F", bound=Callable[..., Any])

def eval(*arrays: Any) -> None:
    """Evaluate Arrays (or lists, tuples, dicts of them) now; other values are ignored."""
def async_eval(*arrays: Any) -> None:
    """Start evaluating Arrays (or trees of them) and return at once."""
def stop_gradient(x: _ArrayLike) -> Array: ...

def value_and_grad(fun: Callable[..., Any], argnums: int | Sequence[int] = 0) -> Callable[..., tuple[Any, Any]]:
    """A function computing (fun(*args), gradient of fun w.r.t. args[argnums]).

    The gradient has the structure of that argument (an Array, or a
    list/tuple/dict of Arrays); with a sequence of argnums, a tuple of those."""
def grad(fun: Callable[..., Any], argnums: int | Sequence[int] = 0) -> Callable[..., Any]:
    """A function computing the gradient of scalar-valued fun w.r.t. args[argnums]."""
def vjp(fun: Callable[..., Any], primals: Sequence[Array], cotangents: Sequence[Array]) -> tuple[list[Array], list[Array]]:
    """Vector-Jacobian product: (outputs, vjps)."""
def jvp(fun: Callable[..., Any], primals: Sequence[Array], tangents: Sequence[Array]) -> tuple[list[Array], list[Array]]:
    """Jacobian-vector product: (outputs, jvps)."""
def vmap(
    fun: Callable[..., Any],
    in_axes: int | Sequence[int | None] = 0,
    out_axes: int | Sequence[int] = 0,
) -> Callable[..., Any]:
    """Vectorize fun over an axis of its inputs."""
def checkpoint(fun: _F) -> _F:
    """fun wrapped so that, under grad, its intermediates are recomputed rather than kept."""

@final
class CompiledFunction(Generic[_P, _R]):
    """A function compiled by mlxcy.compile()."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        """Not constructible: use mlxcy.compile(fun)."""
    @property
    def shapeless(self) -> bool: ...
    @property
    def __wrapped__(self) -> Callable[_P, _R]: ...
    def __call__(self, *args: _P.args, **kwargs: _P.kwargs) -> _R: ...

def compile(fun: Callable[_P, _R], shapeless: bool = False) -> CompiledFunction[_P, _R]:
    """Compile fun: the first call traces it into a graph that MLX simplifies and
    fuses; later calls with matching inputs run that graph."""
def disable_compile() -> None: ...
def enable_compile() -> None: ...

@final
class NativeCompiled:
    """A native function compiled by compile_native() (see transforms.pxd)."""

    def __call__(self, *arrays: Array) -> list[Array]: ...
