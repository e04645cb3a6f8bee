"""mlxcy.device and mlxcy.memory, with mlx.core (MLX's own bindings) as the
reference for what the device layer reports."""
import platform
import subprocess
import sys
import threading

import mlx.core as mx
import numpy as np
import pytest

import mlxcy as mc
from mlxcy import device as D
from mlxcy import memory as M
from mlxcy import transforms as T

import subproc


def test_device_objects():
    assert D.cpu == D.Device("cpu", 0) and D.cpu != D.gpu
    assert hash(D.Device("cpu")) == hash(D.cpu)
    assert repr(D.Device("gpu", 1)) == "Device(gpu, 1)"
    with pytest.raises(ValueError, match="type"):
        D.Device("tpu")
    with pytest.raises(TypeError, match="default_stream"):
        D.Stream(0, D.cpu)


def test_default_device_and_availability_match_mlx():
    assert D.default_device().type == ("gpu" if mx.default_device() == mx.gpu else "cpu")
    assert D.is_available("cpu") == mx.is_available(mx.cpu)
    assert D.is_available(D.gpu) == mx.is_available(mx.gpu)
    assert D.device_count("gpu") == mx.device_count(mx.gpu)
    assert D.device_count("cpu") == mx.device_count(mx.cpu)
    assert D.device_info(D.cpu) == mx.device_info(mx.cpu)


@pytest.mark.skipif(mx.is_available(mx.gpu), reason="needs a machine without a GPU")
def test_gpu_unavailable_errors():
    with pytest.raises(ValueError, match="set_default_device"):
        D.set_default_device("gpu")
    with pytest.raises(ValueError, match="not available"):
        D.device_info("gpu")
    assert D.default_device() == D.cpu


def test_device_context_restores_the_default():
    before = D.default_device()
    with D.device("cpu") as d:
        assert d == D.cpu and D.default_device() == D.cpu
        assert (mc.array([1.0, 2.0]) * 2).numpy().tolist() == [2.0, 4.0]
    assert D.default_device() == before


def test_streams():
    s0 = D.default_stream("cpu")
    s1 = D.new_stream(D.cpu)
    assert s0.device == D.cpu and s1.device == D.cpu and s1 != s0
    with D.stream(s1):
        assert D.default_stream("cpu") == s1
        y = mc.array(np.arange(6.0)).reshape(2, 3) @ mc.array(np.ones((3, 1)))
        T.async_eval(y)
        D.synchronize(s1)
        assert y.numpy().ravel().tolist() == [3.0, 12.0]
    assert D.default_stream("cpu") == s0
    D.set_default_stream(s1)
    try:
        assert D.default_stream("cpu") == s1
    finally:
        D.set_default_stream(s0)
    D.synchronize()
    with pytest.raises(TypeError, match="Stream"):
        D.synchronize("cpu")


def test_streams_are_per_thread():
    seen = {}

    def work():
        seen["stream"] = D.default_stream("cpu")
        seen["value"] = (mc.array([3.0]) * 3).item()

    t = threading.Thread(target=work)
    t.start()
    t.join()
    assert seen["value"] == 9.0
    assert seen["stream"] != D.default_stream("cpu")


def test_active_memory_follows_allocation_and_free():
    n = 8 << 20                                    # 32 MiB of float32
    M.clear_cache()
    base = M.get_active_memory()
    a = mc.zeros((n,), mc.float32) + 1
    T.eval(a)
    # The CUDA backend keeps a kernel's buffers until the stream's completion
    # callback runs; synchronize so only `a` itself still holds its buffer.
    D.synchronize()
    grown = M.get_active_memory()
    assert grown - base >= a.nbytes
    assert M.get_peak_memory() >= grown
    nbytes = a.nbytes
    a.free()
    assert grown - M.get_active_memory() >= nbytes
    M.reset_peak_memory()
    assert M.get_peak_memory() <= grown - nbytes + (1 << 20)


def test_freed_buffers_are_cached_until_cleared():
    M.clear_cache()
    # 256 KiB each: above the CUDA allocator's small-block pool, which is
    # never reported as cache memory.
    xs = [mc.zeros((1 << 16,), mc.float32) + i for i in range(20)]
    T.eval(xs)
    D.synchronize()
    for x in xs:
        x.free()
    assert M.get_cache_memory() >= 20 * (1 << 18)
    M.clear_cache()
    assert M.get_cache_memory() == 0


def test_limits_round_trip():
    old = M.set_memory_limit(1 << 30)
    try:
        assert M.get_memory_limit() == 1 << 30
    finally:
        assert M.set_memory_limit(old) == 1 << 30
    assert M.get_memory_limit() == old
    prev = M.set_cache_limit(1 << 20)
    assert M.set_cache_limit(prev) == 1 << 20
    assert isinstance(M.set_wired_limit(0), int)
    with pytest.raises(ValueError, match="set_cache_limit"):
        M.set_cache_limit(-1)
    with pytest.raises(TypeError, match="set_memory_limit"):
        M.set_memory_limit("1GB")


_FRAGMENT = r"""
import mlxcy as mc
from mlxcy import memory as M, transforms as T

def rss():
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) << 10 for l in f if l.startswith("VmRSS"))

M.set_cache_limit(0)                     # freed buffers go straight back to malloc
big = mc.zeros((1 << 22,), mc.float32) + 1   # 16 MiB: mmapped; freeing it raises
T.eval(big); big.free()                      # glibc's mmap threshold above 1 MiB
xs, keep = [], []
for i in range(160):                     # 1 MiB buffers, each with a live 64 KiB one after it
    xs.append(mc.zeros((1 << 18,), mc.float32) + i)
    keep.append(mc.zeros((1 << 14,), mc.float32) + i)
    T.eval(xs[-1], keep[-1])
before = rss()
for x in xs:
    x.free()
freed = rss()
trimmed = M.trim_heap()
print(before >> 20, freed >> 20, rss() >> 20, trimmed)
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="malloc_trim is glibc's")
@pytest.mark.skipif(mx.is_available(mx.gpu), reason="CPU buffers live on the C heap")
def test_trim_heap_returns_the_pages_of_freed_buffers():
    # In a fresh process, so the heap's state is this test's: 160 MiB of
    # buffers freed between live ones stay resident until the trim.
    r = subprocess.run([sys.executable, "-c", _FRAGMENT], capture_output=True, text=True,
                       env=subproc.env(), cwd=subproc.CWD)
    assert r.returncode == 0, r.stderr
    out = r.stdout.split()
    before, freed, after, trimmed = int(out[0]), int(out[1]), int(out[2]), out[3]
    assert freed > before - 40, (before, freed)         # free() alone kept the pages
    assert trimmed == "True" and after < freed - 120, (before, freed, after)
