"""mlxcy: Cython bindings to Apple's MLX, and a small-LLM stack built on them."""
import os as _os

from mlxcy.core import (  # noqa: F401
    Array, Dtype, array, asarray, dtype,
    bool_, uint8, uint16, uint32, uint64, int8, int16, int32, int64,
    float16, float32, float64, bfloat16, complex64,
)
from mlxcy.ops import *  # noqa: F401,F403

__version__ = "0.1.0"


def get_include():
    """Directories to pass to a C++ compiler building a module that cimports
    mlxcy: mlxcy's own helper headers, then MLX's headers."""
    import mlx
    here = _os.path.dirname(__file__)
    ours = _os.path.join(here, "include")
    if not _os.path.isdir(ours):  # editable install: the repository's include/
        ours = _os.path.join(_os.path.dirname(here), "include")
    mlx_root = list(mlx.__path__)[0]
    return [ours, _os.path.join(mlx_root, "include")]


def get_library_dirs():
    """Where libmlx.so lives, for linking a module that cimports mlxcy."""
    import mlx
    return [_os.path.join(list(mlx.__path__)[0], "lib")]
