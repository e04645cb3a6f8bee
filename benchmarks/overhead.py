"""Binding overhead, mlxcy vs mlx.core in one process: the time to build (not
evaluate) a lazy op from Python.  Also the native floor: the same MLX C++ op
called from a Cython loop with no Python in between, so the overhead each
binding adds on top of MLX itself can be compared.

    python benchmarks/overhead.py
"""
import timeit

import numpy as np

import mlx.core as mc
import mlxcy as mx
from mlxcy.core import _time_native_add


def best(fn, number=20000, repeat=7):
    return min(timeit.repeat(fn, number=number, repeat=repeat)) / number * 1e6


def main():
    x = np.ones((16, 16), np.float32)
    a, b = mx.array(x), mx.array(x)
    A, B = mc.array(x), mc.array(x)
    mx.eval(a, b)
    mc.eval(A, B)

    def chain(m, p, q):
        y = p + q
        y = y * p
        y = y - q
        y = y @ p
        y = y + 1.0
        y = y * 0.5
        y = -y
        y = y.T
        y = y / q
        return y + p

    cases = {
        "add (a + b)": (lambda: a + b, lambda: A + B),
        "add (mx.add)": (lambda: mx.add(a, b), lambda: mc.add(A, B)),
        "matmul (a @ b)": (lambda: a @ b, lambda: A @ B),
        "reshape": (lambda: mx.reshape(a, (256,)), lambda: mc.reshape(A, (256,))),
        "slice a[2:10, ::2]": (lambda: a[2:10, ::2], lambda: A[2:10, ::2]),
        "chain of 10 ops": (lambda: chain(mx, a, b), lambda: chain(mc, A, B)),
    }
    native = min(_time_native_add(a, b, 100000) for _ in range(7)) * 1e6
    print(f"native mlx::core::add from Cython (no Python): {native:.3f} us")
    print("| op | mlxcy us | mlx.core us | ratio | overhead above native add, ratio |")
    print("|---|---|---|---|---|")
    for name, (ours, theirs) in cases.items():
        o, t = best(ours), best(theirs)
        extra = ""
        if name.startswith("add"):
            extra = f"{(o - native) / (t - native):.2f}"
        print(f"| {name} | {o:.3f} | {t:.3f} | {o / t:.2f} | {extra} |")


if __name__ == "__main__":
    main()
