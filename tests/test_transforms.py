"""mlxcy.transforms: gradients against central finite differences (numpy,
float64), vjp/jvp duality, vmap against a Python loop, compile against the
uncompiled function, and exception propagation out of traced callables."""
import gc
import threading

import numpy as np
import pytest

import mlxcy as mc
from mlxcy import transforms as T

RNG = np.random.default_rng(1234)


def fd_grad(f, x, eps=1e-6):
    """Central finite differences of scalar f at float64 numpy x."""
    x = np.array(x, dtype=np.float64)
    g = np.zeros_like(x)
    for i in np.ndindex(x.shape):
        d = np.zeros_like(x)
        d[i] = eps
        g[i] = (f(x + d) - f(x - d)) / (2 * eps)
    return g


def close(a, b, rtol=2e-3, atol=2e-4):
    np.testing.assert_allclose(np.asarray(a, dtype=np.float64), b, rtol=rtol, atol=atol)


# Each test function is written once against a namespace: numpy or mlxcy.
def poly(lib, x):
    return lib.sum(3 * x ** 3 - 2 * x * x + x - 7)


def explog(lib, x):
    return lib.sum(lib.exp(0.5 * x) * lib.log(1 + x * x) / (2 + x * x))


def mlp_loss(lib, p, x, y):
    h = lib.tanh(x @ p["w1"] + p["b1"])
    out = h @ p["w2"]
    return lib.sum((out - y) ** 2) / y.shape[0]


@pytest.mark.parametrize("fun", [poly, explog])
def test_grad_matches_finite_differences(fun):
    x = RNG.uniform(-1.5, 1.5, size=(3, 4))
    g = T.grad(lambda a: fun(mc, a))(mc.array(x))
    assert isinstance(g, mc.Array) and g.shape == x.shape
    close(g.numpy(), fd_grad(lambda v: fun(np, v), x))


def test_value_and_grad_of_mlp_loss_over_a_dict_of_params():
    p = {"w1": RNG.normal(size=(5, 8)) * 0.5, "b1": RNG.normal(size=(8,)) * 0.1,
         "w2": RNG.normal(size=(8, 2)) * 0.5}
    x, y = RNG.normal(size=(6, 5)), RNG.normal(size=(6, 2))
    mp = {k: mc.array(v) for k, v in p.items()}
    loss, g = T.value_and_grad(lambda q, a, b: mlp_loss(mc, q, a, b))(
        mp, mc.array(x), mc.array(y))
    close(loss.item(), mlp_loss(np, p, x, y))
    assert sorted(g) == sorted(p)
    for k in p:
        def f(v, k=k):
            return mlp_loss(np, {**p, k: v}, x, y)
        close(g[k].numpy(), fd_grad(f, p[k]))


def test_grad_argnums_tuple_negative_and_aux_outputs():
    a, b = RNG.normal(size=3), RNG.normal(size=3)

    def f(x, y, scale):           # scale: a Python constant passed through
        return mc.sum(x * y * y) * scale, x * 2

    (val, aux), (ga, gb) = T.value_and_grad(f, argnums=(0, -2))(mc.array(a), mc.array(b), 3.0)
    close(val.item(), 3 * np.sum(a * b * b))
    close(aux.numpy(), 2 * a)                      # aux returned, not differentiated
    close(ga.numpy(), 3 * b * b)
    close(gb.numpy(), 6 * a * b)
    gy = T.grad(lambda x, y: mc.sum(x * y * y), argnums=1)(mc.array(a), mc.array(b))
    close(gy.numpy(), 2 * a * b)


def test_grad_rejects_bad_requests():
    x = mc.array([1.0, 2.0])
    with pytest.raises(ValueError, match="scalar"):
        T.grad(lambda a: a * a)(x)
    with pytest.raises(ValueError, match="argnums 3"):
        T.grad(lambda a: mc.sum(a), argnums=3)(x)
    with pytest.raises(ValueError, match="no Array"):
        T.grad(lambda a, b: mc.sum(a) * b, argnums=1)(x, 2.0)
    with pytest.raises(TypeError, match="argnums"):
        T.grad(lambda a: mc.sum(a), argnums="0")


def test_vjp_and_jvp_are_dual_and_match_finite_differences():
    A = RNG.normal(size=(4, 3))

    def f(lib, x, z):
        a = A if lib is np else mc.array(A)
        return lib.tanh(a @ x) * lib.sum(z), z * x[:2]

    x, z = RNG.normal(size=3), RNG.normal(size=2)
    u = [RNG.normal(size=4), RNG.normal(size=2)]      # one cotangent per output
    v = [RNG.normal(size=3), RNG.normal(size=2)]      # one tangent per input
    fm = lambda a, b: f(mc, a, b)
    prim = [mc.array(x), mc.array(z)]
    outs, vjps = T.vjp(fm, prim, [mc.array(t) for t in u])
    outs2, jvps = T.jvp(fm, prim, [mc.array(t) for t in v])
    assert len(outs) == 2 and len(vjps) == 2 and len(jvps) == 2
    lhs = sum(np.dot(g.numpy(), t) for g, t in zip(vjps, v))
    rhs = sum(np.dot(t, j.numpy()) for t, j in zip(u, jvps))
    close(lhs, rhs)
    # jvp is the directional derivative: check against finite differences.
    eps = 1e-6
    fp = f(np, x + eps * v[0], z + eps * v[1])
    fmn = f(np, x - eps * v[0], z - eps * v[1])
    for j, a, b in zip(jvps, fp, fmn):
        close(j.numpy(), (a - b) / (2 * eps))
    for o, ref in zip(outs, f(np, x, z)):
        close(o.numpy(), ref)


def test_vjp_validates_its_lists():
    with pytest.raises(TypeError, match="primals"):
        T.vjp(lambda a: a, mc.array([1.0]), [mc.array([1.0])])
    with pytest.raises(TypeError, match=r"cotangents\[0\]"):
        T.vjp(lambda a: a, [mc.array([1.0])], [1.0])


def test_vmap_matches_a_python_loop():
    W = RNG.normal(size=(3, 4)).astype(np.float32)
    xs = RNG.normal(size=(5, 4)).astype(np.float32)

    def f(w, x):
        return mc.tanh(w @ x), mc.sum(x)

    ys, ss = T.vmap(f, in_axes=(None, 0))(mc.array(W), mc.array(xs))
    assert ys.shape == (5, 3) and ss.shape == (5,)
    for i in range(5):
        y, s = f(mc.array(W), mc.array(xs[i]))
        close(ys.numpy()[i], y.numpy())
        close(ss.numpy()[i], s.item())
    # Mapping over the last axis and stacking outputs along axis 1.
    out = T.vmap(lambda x: x * 2 + 1, in_axes=-1, out_axes=1)(mc.array(xs.T))
    close(out.numpy(), xs.T * 2 + 1)


def test_compile_matches_uncompiled_and_reuses_the_trace():
    calls = []

    def f(x, y):
        calls.append(x.shape)
        return mc.exp(x) * y - x * x

    c = T.compile(f)
    x, y = RNG.normal(size=(3, 4)).astype(np.float32), RNG.normal(size=(3, 4)).astype(np.float32)
    expect = np.exp(x) * y - x * x
    for _ in range(3):
        close(c(mc.array(x), mc.array(y)).numpy(), expect)
    assert len(calls) == 1, "same shapes must reuse the compiled graph"
    close(c(mc.array(x[:2]), mc.array(y[:2])).numpy(), expect[:2])
    assert len(calls) == 2, "a new shape traces again when not shapeless"


def test_compile_shapeless_works_across_shapes():
    calls = []

    def f(x):
        calls.append(1)
        return x * x + 2 * x

    c = T.compile(f, shapeless=True)
    for n in (3, 7):
        x = RNG.normal(size=n).astype(np.float32)
        close(c(mc.array(x)).numpy(), x * x + 2 * x)
    assert len(calls) == 1


def test_compiled_functions_are_never_confused():
    x = mc.array([1.0, 2.0, 3.0])
    # Freed CompiledFunction objects often reuse an address: the cache entries
    # of a dead one must be gone, or a newcomer would get its graph.
    for k in range(12):
        c = T.compile(lambda a, k=k: a * k + k)
        close(c(x).numpy(), np.array([1.0, 2, 3]) * k + k)
        del c
        gc.collect()
    add, mul = T.compile(lambda a: a + 3), T.compile(lambda a: a * 3)
    close(add(x).numpy(), [4, 5, 6])
    close(mul(x).numpy(), [3, 6, 9])


def test_compile_keys_on_python_constants_and_structure():
    c = T.compile(lambda a, k, pair: a * k + pair[0] - pair[1])
    x = mc.array([1.0, 2.0])
    p = [mc.array([1.0, 1.0]), mc.array([0.5, 0.5])]
    close(c(x, 2, p).numpy(), [2.5, 4.5])
    close(c(x, 3, p).numpy(), [3.5, 6.5])
    close(c(x, 3.5, tuple(p)).numpy(), [4.0, 7.5])
    with pytest.raises(TypeError, match="hashable"):
        c(x, bytearray(b"unhashable"), p)


def test_compile_of_grad():
    x = RNG.uniform(-1, 1, size=5)
    g = T.compile(T.grad(lambda a: poly(mc, a)))
    for _ in range(2):
        close(g(mc.array(x)).numpy(), fd_grad(lambda v: poly(np, v), x))


def test_checkpoint_gradient_equals_plain_gradient():
    x = RNG.uniform(-1, 1, size=(2, 3))
    calls = []

    def body(a):
        calls.append(1)
        return mc.exp(a) * mc.sin(a)

    plain = T.grad(lambda a: mc.sum(body(a) * a))(mc.array(x))
    n = len(calls)
    ck = T.checkpoint(body)
    close(ck(mc.array(x)).numpy(), np.exp(x) * np.sin(x))
    g = T.grad(lambda a: mc.sum(ck(a) * a))(mc.array(x))
    close(g.numpy(), plain.numpy(), rtol=1e-5, atol=1e-6)
    close(g.numpy(), fd_grad(lambda v: np.sum(np.exp(v) * np.sin(v) * v), x))
    assert len(calls) - n >= 3, "checkpoint recomputes body in the backward pass"


def test_stop_gradient_zeroes_the_gradient():
    x = mc.array([1.0, -2.0, 3.0])
    g = T.grad(lambda a: mc.sum(T.stop_gradient(a * a) + a))(x)
    close(g.numpy(), [1.0, 1.0, 1.0])
    g0 = T.grad(lambda a: mc.sum(T.stop_gradient(a) * 5))(x)
    close(g0.numpy(), [0.0, 0.0, 0.0])


class Boom(Exception):
    pass


@pytest.mark.parametrize("transform", ["grad", "value_and_grad", "vjp", "jvp", "vmap",
                                       "compile", "checkpoint", "grad_of_checkpoint"])
def test_python_exception_propagates_unchanged(transform):
    err = Boom("from inside the traced function")

    def bad(a):
        raise err

    x = mc.array([1.0, 2.0])
    run = {
        "grad": lambda: T.grad(bad)(x),
        "value_and_grad": lambda: T.value_and_grad(bad)(x),
        "vjp": lambda: T.vjp(bad, [x], [x]),
        "jvp": lambda: T.jvp(bad, [x], [x]),
        "vmap": lambda: T.vmap(bad)(x),
        "compile": lambda: T.compile(bad)(x),
        "checkpoint": lambda: T.checkpoint(bad)(x),
        "grad_of_checkpoint": lambda: T.grad(lambda a: mc.sum(T.checkpoint(bad)(a)))(x),
    }[transform]
    with pytest.raises(Boom) as info:
        run()
    assert info.value is err
    # MLX left its tracing state: ordinary evaluation works again.
    assert (x * 2).numpy().tolist() == [2.0, 4.0]
    assert T.grad(lambda a: mc.sum(a * a))(x).numpy().tolist() == [2.0, 4.0]


def test_eval_accepts_nested_structures_and_async_eval():
    a = mc.array([1.0, 2.0]) * 3
    tree = {"a": a, "rest": [a + 1, (a * a, "ignored")]}
    T.eval(tree, a - 1)
    T.async_eval(a / 2)
    assert (a / 2).numpy().tolist() == [1.5, 3.0]
    assert tree["rest"][1][0].numpy().tolist() == [9.0, 36.0]


def test_grad_in_another_thread():
    out = {}

    def work():
        x = mc.array([0.5, 1.5])
        out["g"] = T.grad(lambda a: mc.sum(a ** 3))(x).numpy()

    t = threading.Thread(target=work)
    t.start()
    t.join()
    close(out["g"], 3 * np.array([0.5, 1.5]) ** 2)


# ------------------------------------------------- native (Cython) functions --

NATIVE_SETUP = """
import os, mlxcy
from setuptools import Extension, setup
from Cython.Build import cythonize
pkg_root = os.path.dirname(os.path.dirname(mlxcy.__file__))
libs = mlxcy.get_library_dirs()
ext = Extension("native_fn", ["native_fn.pyx"], language="c++",
                include_dirs=mlxcy.get_include(), library_dirs=libs, libraries=["mlx"],
                runtime_library_dirs=libs, extra_compile_args=["-std=c++20", "-O0"])
setup(ext_modules=cythonize([ext], include_path=[pkg_root], quiet=True),
      script_args=["build_ext", "--inplace", "-q"])
"""


@pytest.fixture(scope="module")
def native(tmp_path_factory):
    """Build tests/cython_ext/native_fn.pyx, an external module using the
    transforms.pxd API, the way a user's package would."""
    import os
    import subprocess
    import sys
    d = tmp_path_factory.mktemp("native_fn")
    src = os.path.join(os.path.dirname(__file__), "cython_ext", "native_fn.pyx")
    (d / "native_fn.pyx").write_text(open(src).read())
    (d / "setup.py").write_text(NATIVE_SETUP)
    import subproc
    r = subprocess.run([sys.executable, "setup.py"], cwd=d, capture_output=True, text=True,
                       env=subproc.env())
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    sys.path.insert(0, str(d))
    try:
        import native_fn
        yield native_fn
    finally:
        sys.path.remove(str(d))


def test_native_grad_value_and_grad_vjp(native):
    x, w = RNG.normal(size=4), RNG.normal(size=4)
    loss = lambda a, b: 1.5 * np.sum(np.exp(a) * b)
    gx, gw = native.grad_loss(mc.array(x), mc.array(w), 1.5, [0, 1])
    close(gx.numpy(), fd_grad(lambda v: loss(v, w), x))
    close(gw.numpy(), fd_grad(lambda v: loss(x, v), w))
    val, grads = native.value_and_grad_loss(mc.array(x), mc.array(w), 1.5)
    close(val.item(), loss(x, w))
    assert len(grads) == 1
    close(grads[0].numpy(), gx.numpy(), rtol=1e-6, atol=0)
    outs, vjps = native.vjp_loss(mc.array(x), mc.array(w), 1.5, mc.array(2.0))
    close(outs[0].item(), loss(x, w))
    close(vjps[0].numpy(), 2 * gx.numpy(), rtol=1e-6, atol=0)
    close(vjps[1].numpy(), 2 * gw.numpy(), rtol=1e-6, atol=0)


def test_native_compile_and_exceptions(native):
    x, w = RNG.normal(size=3), RNG.normal(size=3)
    c2, c3 = native.compiled_loss(2.0), native.compiled_loss(3.0)
    gc.collect()                      # the context lives in the compiled object
    for _ in range(2):
        close(native.call_compiled(c2, mc.array(x), mc.array(w)).item(), 2 * np.sum(np.exp(x) * w))
        close(c3(mc.array(x), mc.array(w))[0].item(), 3 * np.sum(np.exp(x) * w))
    with pytest.raises(KeyError, match="inside a native function"):
        native.grad_failing(mc.array([1.0]))
