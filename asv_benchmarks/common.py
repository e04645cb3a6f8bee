"""Shared helpers: both implementations behind one small interface, so each
benchmark runs mlxcy and mlx.core (MLX's own bindings) side by side."""
import numpy as np


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
