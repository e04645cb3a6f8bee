"""Shared helpers: both implementations behind one small interface, so each
benchmark runs mlxcy and mlx.core (MLX's own bindings) side by side."""
import os
import sys

import numpy as np

# asv's "existing" environment runs whatever Python finds first, which may be
# an older installed copy of mlxcy; time this checkout's in-place build
# (tools/build.sh) instead whenever there is one.
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_PKG = os.path.join(_ROOT, "mlxcy")
if os.path.isdir(_PKG) and any(f.startswith("core.") and f.endswith((".so", ".pyd"))
                               for f in os.listdir(_PKG)):
    if _ROOT not in sys.path:
        sys.path.insert(0, _ROOT)


def backend(impl):
    if impl == "mlxcy":
        import mlxcy
        return mlxcy
    import mlx.core
    return mlx.core


def on_gpu():
    import mlx.core as mx
    return mx.default_device() == mx.gpu


def rand(impl, shape, dtype="float32", seed=0):
    m = backend(impl)
    x = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
    a = m.array(x)
    if dtype != "float32":
        a = a.astype(getattr(m, dtype))
    if impl == "mlxcy":
        a.eval()
    else:
        m.eval(a)
    return a


def evaluate(impl, a):
    if impl == "mlxcy":
        a.eval()
    else:
        backend(impl).eval(a)
