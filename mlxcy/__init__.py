"""mlxcy: Cython bindings to Apple's MLX, and a small-LLM stack built on them.

    import mlxcy as mx
    a = mx.array([[1.0, 2.0], [3.0, 4.0]])
    b = mx.softmax(a @ a.T, axis=-1)
    mx.eval(b)

The array layer is this package's top level, as in mlx.core: core (Array,
dtypes), ops (also re-exported here), fast, random, transforms (eval, grad,
compile ... re-exported here), device, memory, io, cpu_kernels, native
(Cython declarations of MLX's C++ API).  Above it, one folder per layer:
nn and models (layers, model families, KV caches, loading, conversion),
tokenizer and chat, generation (engine, samplers, TextModel and load),
train, distributed, serve, cli.  tuning holds the process-wide knobs.
docs/internals.md maps the layers.
"""
import os as _os


def _cuda_runtime_setup() -> None:
    """With MLX's CUDA backend, kernels that MLX compiles at run time (gather,
    attention, compiled graphs) crash the process unless MLX's own Python
    module has been initialised first (seen with mlx-cuda-13 0.32.4 on an H100;
    benchmarks/gpu_probe.py shows it).  Importing it once costs ~0.1 s."""
    import importlib.metadata
    try:
        importlib.metadata.distribution("mlx-cuda-13")
    except importlib.metadata.PackageNotFoundError:
        return
    import mlx.core  # noqa: F401


_cuda_runtime_setup()

from mlxcy.core import (  # noqa: F401
    Array, Dtype, array, asarray, dtype,
    bool_, uint8, uint16, uint32, uint64, int8, int16, int32, int64,
    float16, float32, float64, bfloat16, complex64,
)
from mlxcy.ops import *  # noqa: F401,F403
from mlxcy import ops as _ops
from mlxcy.transforms import (  # noqa: F401
    eval, async_eval, grad, value_and_grad, vjp, jvp, vmap, checkpoint, compile,
    disable_compile, enable_compile,
)
from mlxcy.device import (  # noqa: F401
    Device, Stream, cpu, gpu, default_device, set_default_device, default_stream, new_stream,
    set_default_stream, stream, synchronize, is_available, device_count, device_info,
)
from mlxcy import fast, random, memory, io  # noqa: F401
from mlxcy.memory import (  # noqa: F401
    get_active_memory, get_peak_memory, reset_peak_memory, get_cache_memory, clear_cache,
    set_memory_limit, set_cache_limit, set_wired_limit, get_memory_limit,
)

__version__ = "0.1.0"

# The LLM stack's entry points.  Imported eagerly (~30 ms) rather than through
# a module __getattr__: a module defining __getattr__ keeps CPython from
# specializing attribute loads on it, which made every `mx.reshape`-style
# lookup ~15 ns slower (benchmarks/overhead.py).
from mlxcy.errors import (  # noqa: E402,F401
    Error, ModelFormatError, LoadError, GGUFError, TokenizerError, ChatTemplateError, OptionError,
    OptionTypeError, DataError, AdapterError, SessionError,
)
from mlxcy import tuning  # noqa: E402,F401
from mlxcy.generation.inference import load, TextModel  # noqa: E402,F401
from mlxcy.generation.api import GenerationOptions  # noqa: E402,F401
from mlxcy.tokenizer import Tokenizer  # noqa: E402,F401
from mlxcy.generation.sample import Sampler  # noqa: E402,F401
from mlxcy.chat import ChatTemplate  # noqa: E402,F401
from mlxcy.models.load import load_model  # noqa: E402,F401
from mlxcy.models.discover import discover  # noqa: E402,F401
from mlxcy import assets  # noqa: E402,F401  (mlxcy.assets.smollm2_gguf() etc.)


def get_include() -> list[str]:
    """Directories to pass to a C++ compiler building a module that cimports
    mlxcy: mlxcy's own helper headers, then MLX's headers."""
    import mlx
    here = _os.path.dirname(__file__)
    ours = _os.path.join(here, "include")
    if not _os.path.isdir(ours):  # editable install: the repository's include/
        ours = _os.path.join(_os.path.dirname(here), "include")
    mlx_root = list(mlx.__path__)[0]
    return [ours, _os.path.join(mlx_root, "include")]


def get_library_dirs() -> list[str]:
    """Where libmlx.so lives, for linking a module that cimports mlxcy."""
    import mlx
    return [_os.path.join(list(mlx.__path__)[0], "lib")]


# The public names: what `from mlxcy import *` binds, and what type checkers
# count as re-exported (mypy --strict sees an imported name as this module's
# only when it is listed here).  The ops come from mlxcy.ops.__all__.
__all__ = [
    "Array", "Dtype", "array", "asarray", "dtype",
    "bool_", "uint8", "uint16", "uint32", "uint64", "int8", "int16", "int32", "int64",
    "float16", "float32", "float64", "bfloat16", "complex64",
    "eval", "async_eval", "grad", "value_and_grad", "vjp", "jvp", "vmap", "checkpoint",
    "compile", "disable_compile", "enable_compile",
    "Device", "Stream", "cpu", "gpu", "default_device", "set_default_device", "default_stream",
    "new_stream", "set_default_stream", "stream", "synchronize", "is_available", "device_count",
    "device_info",
    "fast", "random", "memory", "io", "tuning", "assets",
    "get_active_memory", "get_peak_memory", "reset_peak_memory", "get_cache_memory",
    "clear_cache", "set_memory_limit", "set_cache_limit", "set_wired_limit", "get_memory_limit",
    "Error", "ModelFormatError", "LoadError", "GGUFError", "TokenizerError", "ChatTemplateError",
    "OptionError", "OptionTypeError", "DataError", "AdapterError", "SessionError",
    "load", "TextModel", "GenerationOptions", "Tokenizer", "Sampler", "ChatTemplate",
    "load_model", "discover", "get_include", "get_library_dirs",
]
__all__ += _ops.__all__
