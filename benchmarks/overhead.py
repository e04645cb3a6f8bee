"""Binding overhead, mlxcy vs mlx.core in one process: the time to build (not
evaluate) a lazy op from Python, and the native floor of each case: the same
MLX C++ ops called from a Cython loop with no Python in between
(benchmarks/native_timers.pyx).  What each binding adds above the floor is its
overhead; the last column is mlxcy's overhead over mlx.core's (target <= 0.7).

    python benchmarks/overhead.py [--processes 7] [--repeat 25] [--scale 1.0]

Each statement is timed inline in timeit's loop (no Python function call per
iteration, operands in local variables), so the harness adds only the loop
step, printed as "empty loop" and left in both bindings' times.  Within one
process, rounds interleave mlxcy, mlx.core and the native floor, and each
figure is the best round.  Figures also move from one process to the next
(heap layout: the 10-op chain by +-0.15 us), so the whole measurement runs in
several fresh processes: the table gives the median over processes of each
figure and of the overhead ratio, plus the ratio's range.
"""
import argparse
import json
import statistics
import subprocess
import sys
import timeit
from pathlib import Path

import numpy as np

# This checkout's in-place build, not an installed copy.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import mlx.core as mc  # noqa: E402
import mlxcy as mx  # noqa: E402
import mlxcy.ops as mops  # noqa: E402
import build_native_timers  # noqa: E402
import overhead_cases  # noqa: E402
from overhead_cases import floor  # noqa: E402

nt = build_native_timers.load()

# name, statement (run with m = the binding's module, a, b = 16x16 float32
# arrays), native floor timer, calls per round
CASES = [(name, stmt, floor(nt, name), number)
         for name, (stmt, _, _, number) in overhead_cases.CASES.items()] + [
    # Not part of the target: the two m.* cases again with m = mlxcy.ops for
    # mlxcy (mlx.core unchanged), separating the cost of looking the function
    # up on the mlxcy package, whose module-level __getattr__ (lazy imports)
    # stops Python 3.11 from specialising `mlxcy.<name>` lookups.
    ("(info) add via mlxcy.ops", "m.add(a, b)", floor(nt, "add (m.add)"), 20000),
    ("(info) reshape via mlxcy.ops", "m.reshape(a, (256,))", floor(nt, "reshape to (256,)"),
     20000),
]


def timer(stmt, m, a, b):
    return timeit.Timer(stmt, setup="m = _m; a = _a; b = _b",
                        globals={"_m": m, "_a": a, "_b": b})


def ours(name):
    """The module mlxcy's statement of case `name` runs with."""
    return mops if "via mlxcy.ops" in name else mx


def measure(repeat, scale):
    """One process's best-of-`repeat` figures, in seconds per statement."""
    x = np.ones((16, 16), np.float32)
    a, b = mx.array(x), mx.array(x)
    A, B = mc.array(x), mc.array(x)
    mx.eval(a, b)
    mc.eval(A, B)

    # Same results from both bindings (sanity).
    for name, stmt, _, _ in CASES:
        ns_x, ns_c = {"m": ours(name), "a": a, "b": b}, {"m": mc, "a": A, "b": B}
        last = stmt.splitlines()[-1]
        body = "\n".join(stmt.splitlines()[:-1])
        exec(body, {}, ns_x)
        exec(body, {}, ns_c)
        rx, rc = eval(last, {}, ns_x), eval(last, {}, ns_c)
        assert tuple(rx.shape) == tuple(rc.shape), name
        assert np.allclose(np.asarray(rx), np.asarray(rc)), name

    best = {name: [float("inf")] * 3 for name, *_ in CASES}
    empty = float("inf")
    attr = [float("inf")] * 2     # `m.reshape` alone: the module attribute lookup
    for _ in range(repeat):
        n = int(20000 * scale)
        empty = min(empty, timer("pass", mx, a, b).timeit(n) / n)
        attr[0] = min(attr[0], timer("m.reshape", mx, a, b).timeit(n) / n)
        attr[1] = min(attr[1], timer("m.reshape", mc, A, B).timeit(n) / n)
        for name, stmt, native, number in CASES:
            n = max(1, int(number * scale))
            row = best[name]
            row[0] = min(row[0], timer(stmt, ours(name), a, b).timeit(n) / n)
            row[1] = min(row[1], timer(stmt, mc, A, B).timeit(n) / n)
            row[2] = min(row[2], native(a, b, n))
    return {"empty": empty, "attr": attr, "cases": best}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--processes", type=int, default=7, help="fresh processes; medians are reported")
    ap.add_argument("--repeat", type=int, default=25, help="rounds per process; each figure is the best")
    ap.add_argument("--scale", type=float, default=1.0, help="multiply calls per round")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(measure(args.repeat, args.scale)))
        return

    runs = []
    for _ in range(args.processes):
        out = subprocess.run([sys.executable, __file__, "--child", "--repeat", str(args.repeat),
                              "--scale", str(args.scale)], check=True, capture_output=True, text=True)
        runs.append(json.loads(out.stdout))
    med = statistics.median
    us = 1e6
    print(f"mlxcy from {Path(mx.__file__).parent}, mlx {mc.__version__}; "
          f"{args.processes} processes x best of {args.repeat} rounds")
    print(f"empty loop (timeit's own step, in both bindings' times): "
          f"{med(r['empty'] for r in runs) * us:.3f} us")
    print(f"module attribute lookup `m.reshape` alone (part of the m.* cases): "
          f"mlxcy {med(r['attr'][0] for r in runs) * us:.3f} us, "
          f"mlx.core {med(r['attr'][1] for r in runs) * us:.3f} us")
    print("| case | mlxcy us | mlx.core us | total ratio | native floor us "
          "| mlxcy overhead us | mlx.core overhead us | overhead ratio | ratio range |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, *_ in CASES:
        o, t, f = (med(r["cases"][name][i] for r in runs) * us for i in range(3))
        ratios = []
        for r in runs:
            ro, rt, rf = r["cases"][name]
            ratios.append((ro - rf) / (rt - rf) if rt > rf else float("nan"))
        print(f"| {name} | {o:.3f} | {t:.3f} | {o / t:.2f} | {f:.3f} | {o - f:.3f} | {t - f:.3f} "
              f"| {med(ratios):.2f} | {min(ratios):.2f}-{max(ratios):.2f} |")


if __name__ == "__main__":
    main()
