"""Binding overhead: the time to *build* (not evaluate) a lazy op from Python,
for mlxcy and mlx.core (MLX's nanobind bindings) in the same process."""
from .common import backend, rand

IMPLS = ["mlxcy", "mlx.core"]


class BuildLazyOp:
    params = IMPLS
    param_names = ["impl"]
    number = 20000

    def setup(self, impl):
        self.m = backend(impl)
        self.a, self.b = rand(impl, (16, 16)), rand(impl, (16, 16), seed=1)

    def time_add(self, impl):
        self.a + self.b

    def time_add_function(self, impl):
        self.m.add(self.a, self.b)

    def time_matmul(self, impl):
        self.a @ self.b

    def time_reshape(self, impl):
        self.m.reshape(self.a, (256,))

    def time_slice(self, impl):
        self.a[2:10, ::2]

    def time_chain_of_10(self, impl):
        a, b = self.a, self.b
        x = a + b
        x = x * a
        x = x - b
        x = x @ a
        x = x + 1.0
        x = x * 0.5
        x = -x
        x = x.T
        x = x / b
        x = x + a
