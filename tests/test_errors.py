"""Bad input raises a Python exception carrying MLX's message (mlx.core, MLX's
own bindings, is the reference for the message), naming the file at fault;
nothing crashes the process, and nothing is printed and swallowed."""
import gc
import subprocess
import sys
import textwrap

import mlx.core as mx
import numpy as np
import pytest

import mlxcy as mc
from mlxcy import io as IO
from mlxcy import transforms as T

# MLX's safetensors writer rejects float64; on a GPU, evaluating the array
# for the write fails first ("float64 is not supported on the GPU").
F64_SAVE_ERROR = r"\[save_safetensors\] received invalid dtype|float64 is not supported on the GPU"


def message(fn):
    with pytest.raises(Exception) as info:
        fn()
    return info.type, str(info.value)


def test_shape_mismatch_carries_mlx_message():
    for ours, theirs in [
        (lambda: mc.ones((2, 3)) + mc.ones((4,)), lambda: mx.ones((2, 3)) + mx.ones((4,))),
        (lambda: mc.ones((2, 3)) @ mc.ones((4, 2)), lambda: mx.ones((2, 3)) @ mx.ones((4, 2))),
    ]:
        t, msg = message(ours)
        assert t is ValueError
        assert (t, msg) == message(theirs)


def test_bad_axis_carries_mlx_message():
    t, msg = message(lambda: mc.transpose(mc.ones((2, 3)), (0, 5)))
    assert (t, msg) == message(lambda: mx.transpose(mx.ones((2, 3)), (0, 5)))
    assert "[transpose]" in msg


def test_bad_dtype():
    with pytest.raises(TypeError, match="'foo' is not a dtype"):
        mc.ones((2,)).astype("foo")
    with pytest.raises(RuntimeError, match=r"\[left_shift\]"):
        mc.array([1.0]) << mc.array([1.0])
    with pytest.raises((RuntimeError, ValueError), match=F64_SAVE_ERROR):
        IO.save_safetensors("/tmp/unused.safetensors", {"x": mc.array([1.0, 2.0], dtype=mc.float64)})


def test_mlx_error_inside_a_transformed_function():
    def f(a):
        return mc.sum(a + mc.ones((5,)))
    t, msg = message(lambda: T.grad(f)(mc.ones((3,))))
    assert t is ValueError and msg.startswith("[broadcast_shapes]")
    t2, msg2 = message(lambda: T.compile(f)(mc.ones((3,))))
    assert (t2, msg2) == (t, msg)


@pytest.mark.parametrize("loader", [IO.load_safetensors, IO.load_gguf, IO.load_npy, IO.load])
def test_missing_file_names_the_path(tmp_path, loader):
    path = tmp_path / "nothing_here.safetensors"
    with pytest.raises(FileNotFoundError) as info:
        loader(path)
    assert info.value.filename == str(path)
    with pytest.raises(IsADirectoryError):
        loader(tmp_path)


def test_saving_into_a_missing_directory_names_the_path(tmp_path):
    path = tmp_path / "no" / "such" / "dir.npy"
    with pytest.raises(FileNotFoundError) as info:
        IO.save_npy(path, mc.ones((2,)))
    assert info.value.filename == str(path)


def test_truncated_safetensors(tmp_path):
    good = tmp_path / "good.safetensors"
    IO.save_safetensors(good, {"w": mc.array(np.arange(1000, dtype=np.float32))})
    data = good.read_bytes()
    for cut in (len(data) - 100, 20, 4):
        bad = tmp_path / f"cut{cut}.safetensors"
        bad.write_bytes(data[:cut])
        t, msg = message(lambda: IO.load_safetensors(bad))
        # mlxcy's header check answers before MLX's reader sees the file
        assert t is mc.ModelFormatError and issubclass(t, ValueError), msg
        assert msg.startswith(str(bad)), msg


def test_garbage_gguf(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf file at all" * 10)
    t, msg = message(lambda: IO.load_gguf(bad))
    assert t is mc.GGUFError and str(bad) in msg and "not a GGUF file" in msg


def test_freed_array_raises_value_error():
    a = mc.array([1.0, 2.0])
    a.free()
    for use in (lambda: a + 1, lambda: T.eval(a), lambda: T.grad(lambda x: mc.sum(x))(a),
                lambda: IO.save_npy("/tmp/unused.npy", a), lambda: T.stop_gradient(a)):
        with pytest.raises(ValueError, match="freed"):
            use()


def run_isolated(code):
    """Run code in a fresh interpreter, so a crash fails the test, not the run."""
    import subproc
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                          text=True, env=subproc.env(), timeout=120, cwd=subproc.CWD)


def test_allocation_larger_than_memory_raises_instead_of_crashing():
    # MLX 0.32.4's CPU allocator returns NULL for this and its worker thread
    # segfaults (mlx.core too); mlxcy.eval refuses it up front.
    r = run_isolated("""
        import mlxcy as mc
        from mlxcy import transforms as T
        big = mc.zeros((1 << 20, 1 << 20), mc.uint8)     # 1 TiB
        try:
            T.eval(big)
        except MemoryError as e:
            print("MemoryError:", e)
        print("alive", (mc.array([2.0]) * 2).item())
    """)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "MemoryError: eval: an output of 1099511627776 bytes" in r.stdout
    assert "alive 4.0" in r.stdout


# A failed evaluation leaves MLX 0.32.4's scheduler in a state where a later
# eval that must wait for memory (active > limit) can deadlock -- mlx.core
# too.  So tests that make an evaluation fail, or go over the memory limit,
# run in their own interpreter.

def test_truncated_npy_is_refused_at_load(tmp_path):
    # MLX reads .npy data only on evaluation; its header is checked at load,
    # so a short file never reaches a failing evaluation
    from mlxcy.errors import ModelFormatError
    path = tmp_path / "a.npy"
    np.save(path, np.arange(1000, dtype=np.float32))
    path.write_bytes(path.read_bytes()[:-400])
    with pytest.raises(ModelFormatError, match=r"a\.npy: the header's shape \(1000,\) of <f4 "
                                               r"needs 4000 bytes of data, the file holds 3600"):
        IO.load_npy(path)


def test_memory_limit_is_only_a_guideline_on_cpu():
    # Documented MLX behaviour: going over the limit on CPU does not raise.
    r = run_isolated("""
        import mlxcy as mc
        from mlxcy import memory as M, transforms as T
        old = M.set_memory_limit(1 << 20)
        a = mc.zeros((1 << 21,), mc.float32) + 1
        T.eval(a)
        print(a.nbytes > M.get_memory_limit(), a[-1].item())
    """)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split() == ["True", "1.0"]


def test_nothing_is_printed_and_swallowed(capfd):
    class Oops(Exception):
        pass

    def bad(x):
        raise Oops("loud")

    for run in (lambda: T.compile(bad)(mc.ones((2,))), lambda: T.grad(bad)(mc.ones((2,))),
                lambda: T.vmap(bad)(mc.ones((2, 2)))):
        with pytest.raises(Oops):
            run()
    with pytest.raises(ValueError):
        mc.ones((2, 3)) + mc.ones((4,))
    with pytest.raises(mc.ModelFormatError):
        IO.load_safetensors(__file__)
    gc.collect()                          # compiled functions die: cache entries erased
    out, err = capfd.readouterr()
    assert out == "" and err == ""
