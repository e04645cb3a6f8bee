"""Types of mlxcy.io (io.pyx): .npy, .safetensors and .gguf files."""
import os
from collections.abc import Mapping
from typing import Any, Literal, TypeAlias, overload

from mlxcy.core import Array, _ArrayLike

__all__ = ["load_safetensors", "save_safetensors", "load_gguf", "load_npy", "save_npy",
           "load", "save"]

_Path: TypeAlias = str | os.PathLike[str]

def load_safetensors(path: _Path) -> tuple[dict[str, Array], dict[str, str]]:
    """(dict name -> Array, metadata dict str -> str)."""
def save_safetensors(path: _Path, arrays: Mapping[str, _ArrayLike], metadata: Mapping[str, str] | None = None) -> None: ...
def load_gguf(path: _Path) -> tuple[dict[str, Array], dict[str, Any]]:
    """(dict name -> Array, metadata dict); metadata values are str, list of
    str, int/float/bool, or an Array for numeric arrays."""
def load_npy(path: _Path) -> Array: ...
def save_npy(path: _Path, array: _ArrayLike) -> None: ...
@overload
def load(path: _Path, return_metadata: Literal[False] = False) -> Array | dict[str, Array]:
    """.npy -> Array; .safetensors and .gguf -> dict of Arrays."""
@overload
def load(path: _Path, return_metadata: Literal[True]) -> tuple[dict[str, Array], dict[str, Any]]: ...
@overload
def load(path: _Path, return_metadata: bool) -> Array | dict[str, Array] | tuple[dict[str, Array], dict[str, Any]]: ...
def save(path: _Path, obj: _ArrayLike | Mapping[str, _ArrayLike], metadata: Mapping[str, str] | None = None) -> None:
    """By extension (.npy or .safetensors); without one, an Array goes to .npy
    and a dict to .safetensors."""
