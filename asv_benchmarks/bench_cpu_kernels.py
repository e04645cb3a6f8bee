"""mlxcy's CPU kernels next to MLX's own ops, CPU only: the quantized products
(mlxcy.cpu_kernels.linear against quantized_matmul) for 1 row of x (a decode
step) and several (a speculative step's verification of 4 or 9 positions),
SmolLM2-135M's gate/up shape, 4-bit, group 32, float16 scales as its GGUF
loads them; the MLP's SwiGLU product of a prompt (mlxcy.cpu_kernels.activation
against MLX's compiled silu(g) * u)."""
from .common import backend, evaluate, on_gpu, rand

IMPLS = ["mlxcy", "mlx.core"]


class QuantizedLinearRows:
    params = (IMPLS, [1, 4, 9])
    param_names = ["impl", "rows"]

    def setup(self, impl, rows):
        if on_gpu():
            raise NotImplementedError("mlxcy's CPU kernels: CPU only")
        self.m = backend(impl)
        w = rand(impl, (3072, 576), seed=1)
        self.wq, s, b = self.m.quantize(w, group_size=32, bits=4)
        self.s, self.b = s.astype(self.m.float16), b.astype(self.m.float16)
        self.x = rand(impl, (rows, 576))
        for a in (self.wq, self.s, self.b):
            evaluate(impl, a)

    def time_linear_4bit(self, impl, rows):
        if impl == "mlxcy":
            from mlxcy import cpu_kernels
            y = cpu_kernels.linear(self.x, self.wq, self.s, self.b, 32, 4)
        else:
            y = self.m.quantized_matmul(self.x, self.wq, self.s, self.b, transpose=True,
                                        group_size=32, bits=4)
        evaluate(impl, y)


class SwiGLU:
    params = (IMPLS, [1, 128])
    param_names = ["impl", "rows"]

    def setup(self, impl, rows):
        if on_gpu():
            raise NotImplementedError("mlxcy's CPU kernels: CPU only")
        self.m = backend(impl)
        self.g = rand(impl, (rows, 1536), seed=2)
        self.u = rand(impl, (rows, 1536), seed=3)
        if impl == "mlx.core":   # MLX's fastest form: one compiled kernel
            self.fn = self.m.compile(lambda g, u: g * self.m.sigmoid(g) * u, shapeless=True)

    def time_swiglu(self, impl, rows):
        if impl == "mlxcy":
            from mlxcy import cpu_kernels
            y = cpu_kernels.activation(self.g, self.u, "silu")
        else:
            y = self.fn(self.g, self.u)
        evaluate(impl, y)
