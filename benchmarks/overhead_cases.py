"""The binding-overhead cases, shared by benchmarks/overhead.py (the table)
and asv_benchmarks/bench_overhead.py (asv's ratio).  Each statement runs with
m = the binding's module and a, b = 16x16 float32 arrays; its native floor is
a timer of benchmarks/native_timers.pyx: the same MLX C++ ops called from a
Cython loop."""

CHAIN = """\
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

# name: (statement, native timer, how many of a, b the timer takes, calls per round)
CASES = {
    "add (a + b)": ("a + b", "time_add", 2, 20000),
    "add (m.add)": ("m.add(a, b)", "time_add", 2, 20000),
    "matmul (a @ b)": ("a @ b", "time_matmul", 2, 20000),
    "reshape to (256,)": ("m.reshape(a, (256,))", "time_reshape", 1, 20000),
    "slice a[2:10, ::2]": ("a[2:10, ::2]", "time_slice", 1, 20000),
    "chain of 10 ops": (CHAIN, "time_chain", 2, 2000),
}


def floor(nt, name):
    """Case `name`'s native floor from the built native_timers module nt:
    f(a, b, n) -> seconds per call."""
    _, timer, nargs, _ = CASES[name]
    t = getattr(nt, timer)
    return (lambda a, b, n: t(a, b, n)) if nargs == 2 else (lambda a, b, n: t(a, n))


def as_function(stmt):
    """A statement as a function f(m, a, b) that returns its last line's value."""
    lines = stmt.splitlines()
    body = lines[:-1] + ["return " + lines[-1]]
    ns = {}
    exec("def f(m, a, b):\n" + "\n".join("    " + line for line in body), ns)
    return ns["f"]
