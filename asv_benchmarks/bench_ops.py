"""The Go package's micro-benchmarks, each timed including evaluation, for
mlxcy and mlx.core side by side (param `impl`).  Large matmuls are skipped on
the CPU backend, whose reference BLAS makes them take tens of seconds."""
from .common import backend, evaluate, on_gpu, rand

IMPLS = ["mlxcy", "mlx.core"]


class Matmul:
    params = (IMPLS, [128, 512, 1024, 2048, 4096])
    param_names = ["impl", "n"]

    def setup(self, impl, n):
        if n >= 2048 and not on_gpu():
            raise NotImplementedError("too slow on the CPU backend")
        self.m = backend(impl)
        self.a, self.b = rand(impl, (n, n)), rand(impl, (n, n), seed=1)

    def time_matmul(self, impl, n):
        evaluate(impl, self.m.matmul(self.a, self.b))


class MatvecVocab:
    """1x2048 @ 2048x32000: an LM head."""
    params = IMPLS
    param_names = ["impl"]

    def setup(self, impl):
        self.m = backend(impl)
        self.x, self.w = rand(impl, (1, 2048)), rand(impl, (2048, 32000), seed=1)

    def time_matmul_1x2048x32000(self, impl):
        evaluate(impl, self.m.matmul(self.x, self.w))


class Softmax:
    params = (IMPLS, ["1x1024", "32x32000", "1x128000"])
    param_names = ["impl", "shape"]

    def setup(self, impl, shape):
        self.m = backend(impl)
        self.x = rand(impl, tuple(int(s) for s in shape.split("x")))

    def time_softmax(self, impl, shape):
        evaluate(impl, self.m.softmax(self.x, axis=-1))


class Elementwise1M:
    params = (IMPLS, ["add", "multiply", "silu"])
    param_names = ["impl", "op"]

    def setup(self, impl, op):
        self.m = backend(impl)
        self.a, self.b = rand(impl, (1 << 20,)), rand(impl, (1 << 20,), seed=1)
        if op == "silu":
            if impl == "mlxcy":
                self.f = lambda: self.m.silu(self.a)
            else:
                import mlx.nn as nn
                self.f = lambda: nn.silu(self.a)
        else:
            fn = getattr(self.m, op)
            self.f = lambda: fn(self.a, self.b)

    def time_op(self, impl, op):
        evaluate(impl, self.f())


class Norms:
    params = (IMPLS, ["rms_norm 1x2048", "rms_norm 32x2048", "layer_norm 32x2048"])
    param_names = ["impl", "case"]

    def setup(self, impl, case):
        self.m = backend(impl)
        kind, shape = case.split()
        rows, cols = (int(s) for s in shape.split("x"))
        self.x, self.w, self.b = rand(impl, (rows, cols)), rand(impl, (cols,), seed=1), rand(impl, (cols,), seed=2)
        fast = self.m.fast
        self.f = (lambda: fast.rms_norm(self.x, self.w, 1e-5)) if kind == "rms_norm" else (
            lambda: fast.layer_norm(self.x, self.w, self.b, 1e-5))

    def time_norm(self, impl, case):
        evaluate(impl, self.f())


class Rope:
    params = (IMPLS, ["1x1x32x128", "1x32x512x128"])
    param_names = ["impl", "shape"]

    def setup(self, impl, shape):
        self.m = backend(impl)
        self.x = rand(impl, tuple(int(s) for s in shape.split("x")))

    def time_rope(self, impl, shape):
        evaluate(impl, self.m.fast.rope(self.x, 128, traditional=False, base=10000.0, scale=1.0, offset=0))


class Attention:
    params = (IMPLS, ["1 head seq 32", "32 heads seq 128", "32 heads seq 512"])
    param_names = ["impl", "case"]

    def setup(self, impl, case):
        self.m = backend(impl)
        parts = case.split()
        h, t = int(parts[0]), int(parts[-1])
        self.q, self.k, self.v = (rand(impl, (1, h, t, 64), seed=s) for s in range(3))

    def time_sdpa_causal(self, impl, case):
        evaluate(impl, self.m.fast.scaled_dot_product_attention(
            self.q, self.k, self.v, scale=0.125, mask="causal"))


class Linear:
    params = (IMPLS, ["1x2048->2048", "32x2048->8192"])
    param_names = ["impl", "case"]

    def setup(self, impl, case):
        self.m = backend(impl)
        left, out = case.split("->")
        rows, cols = (int(s) for s in left.split("x"))
        self.x, self.w, self.b = rand(impl, (rows, cols)), rand(impl, (int(out), cols), seed=1), rand(impl, (int(out),), seed=2)

    def time_linear(self, impl, case):
        evaluate(impl, self.m.addmm(self.b, self.x, self.w.T))


class Embedding:
    params = IMPLS
    param_names = ["impl"]

    def setup(self, impl):
        import numpy as np
        self.m = backend(impl)
        self.table = rand(impl, (32000, 2048))
        self.ids = self.m.array(np.random.default_rng(0).integers(0, 32000, 32).astype(np.int32))

    def time_embedding_32_tokens(self, impl):
        evaluate(impl, self.m.take(self.table, self.ids, axis=0))


class Reductions:
    params = (IMPLS, ["sum 1M", "argmax 1x32000"])
    param_names = ["impl", "case"]

    def setup(self, impl, case):
        self.m = backend(impl)
        if case.startswith("sum"):
            x = rand(impl, (1 << 20,))
            self.f = lambda: self.m.sum(x)
        else:
            x = rand(impl, (1, 32000))
            self.f = lambda: self.m.argmax(x, axis=-1)

    def time_reduce(self, impl, case):
        evaluate(impl, self.f())
