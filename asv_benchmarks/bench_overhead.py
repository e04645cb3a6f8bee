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


_CHAIN = """\
y = a + b
y = y * a
y = y - b
y = y @ a
y = y + 1.0
y = y * 0.5
y = -y
y = y.T
y = y / b
y + a"""

# case: (statement, native floor timer name, calls per round); as in
# benchmarks/overhead.py, which prints the full table.
_CASES = {
    "add": ("a + b", "time_add", 10000),
    "add_function": ("m.add(a, b)", "time_add", 10000),
    "matmul": ("a @ b", "time_matmul", 10000),
    "reshape": ("m.reshape(a, (256,))", "time_reshape", 10000),
    "slice": ("a[2:10, ::2]", "time_slice", 10000),
    "chain_of_10": (_CHAIN, "time_chain", 1000),
}


class OverheadRatio:
    """mlxcy's overhead above the native floor (the same MLX C++ ops called
    from Cython, benchmarks/native_timers.pyx) divided by mlx.core's overhead above
    it: the binding-overhead target is <= 0.7.  Best of 7 interleaved rounds."""
    params = list(_CASES)
    param_names = ["case"]
    unit = "ratio"
    timeout = 300

    def setup(self, case):
        import sys
        from pathlib import Path
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
        try:
            import build_native_timers
            self.nt = build_native_timers.load()
        except Exception as e:
            raise NotImplementedError(f"benchmarks/native_timers.pyx could not be built: {e}")
        self.x = (backend("mlxcy"), rand("mlxcy", (16, 16)), rand("mlxcy", (16, 16), seed=1))
        self.c = (backend("mlx.core"), rand("mlx.core", (16, 16)), rand("mlx.core", (16, 16), seed=1))

    def track_overhead_ratio(self, case):
        import timeit
        stmt, floor, n = _CASES[case]
        native = getattr(self.nt, floor)
        _, a, b = self.x
        timers = [timeit.Timer(stmt, setup="m = _m; a = _a; b = _b",
                               globals={"_m": mm, "_a": aa, "_b": bb})
                  for mm, aa, bb in (self.x, self.c)]
        best = [float("inf")] * 3
        for _ in range(7):
            best[0] = min(best[0], timers[0].timeit(n) / n)
            best[1] = min(best[1], timers[1].timeit(n) / n)
            best[2] = min(best[2], native(a, n) if floor in ("time_reshape", "time_slice")
                          else native(a, b, n))
        ours, theirs, f = best
        return (ours - f) / (theirs - f)
