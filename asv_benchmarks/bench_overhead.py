"""Binding overhead: the time to *build* (not evaluate) a lazy op from Python,
for mlxcy and mlx.core (MLX's nanobind bindings) in the same process."""
import sys
from pathlib import Path

from .common import backend, rand

# the cases and native floors of benchmarks/overhead.py
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
from overhead_cases import CASES, CHAIN, as_function, floor  # noqa: E402

IMPLS = ["mlxcy", "mlx.core"]


class BuildLazyOp:
    params = IMPLS
    param_names = ["impl"]
    number = 20000

    def setup(self, impl):
        self.m = backend(impl)
        self.a, self.b = rand(impl, (16, 16)), rand(impl, (16, 16), seed=1)
        self.chain = as_function(CHAIN)

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
        self.chain(self.m, self.a, self.b)


# asv's name -> the case of benchmarks/overhead_cases.py (half its calls per round)
_CASES = {"add": "add (a + b)", "add_function": "add (m.add)", "matmul": "matmul (a @ b)",
          "reshape": "reshape to (256,)", "slice": "slice a[2:10, ::2]",
          "chain_of_10": "chain of 10 ops"}


class OverheadRatio:
    """mlxcy's overhead above the native floor (the same MLX C++ ops called
    from Cython, benchmarks/native_timers.pyx) divided by mlx.core's overhead above
    it: the binding-overhead target is <= 0.7.  Best of 7 interleaved rounds."""
    params = list(_CASES)
    param_names = ["case"]
    unit = "ratio"
    timeout = 300

    def setup(self, case):
        try:
            import build_native_timers
            self.nt = build_native_timers.load()
        except Exception as e:
            raise NotImplementedError(f"benchmarks/native_timers.pyx could not be built: {e}")
        self.x = (backend("mlxcy"), rand("mlxcy", (16, 16)), rand("mlxcy", (16, 16), seed=1))
        self.c = (backend("mlx.core"), rand("mlx.core", (16, 16)), rand("mlx.core", (16, 16), seed=1))

    def track_overhead_ratio(self, case):
        import timeit
        stmt, _, _, n = CASES[_CASES[case]]
        n //= 2
        native = floor(self.nt, _CASES[case])
        _, a, b = self.x
        timers = [timeit.Timer(stmt, setup="m = _m; a = _a; b = _b",
                               globals={"_m": mm, "_a": aa, "_b": bb})
                  for mm, aa, bb in (self.x, self.c)]
        best = [float("inf")] * 3
        for _ in range(7):
            best[0] = min(best[0], timers[0].timeit(n) / n)
            best[1] = min(best[1], timers[1].timeit(n) / n)
            best[2] = min(best[2], native(a, b, n))
        ours, theirs, f = best
        return (ours - f) / (theirs - f)
