"""A user's script over mlxcy's public API (arrays, transforms, load,
generate, GenerationOptions, the engine): mypy --strict must accept it with
mlxcy's stubs (tests/test_stubs.py).  Never run."""
from __future__ import annotations

import numpy as np
import numpy.typing as npt

import mlxcy as mx
from mlxcy import Array, GenerationOptions, Sampler, TextModel, load
from mlxcy.device import device
from mlxcy.generation.engine import Engine, Event
from mlxcy.models.base import Model
from mlxcy.models.cache import Cache


def arrays() -> float:
    a: Array = mx.array([[1.0, 2.0], [3.0, 4.0]], dtype=mx.float32)
    b = mx.softmax(a @ a.T, axis=-1) + 1
    c = mx.where(b > 0.5, b, mx.zeros_like(b)).sum(axis=0)
    mx.eval(b, [c], {"k": c})
    host: npt.NDArray[np.float32] = c.numpy()
    shape: tuple[int, ...] = c.shape
    parts: list[Array] = mx.split(a, 2, axis=0)
    first: Array = a[0, 1:] + a[None][..., -1]
    ok: bool = bool((a == 1.0).all()) and a.dtype == mx.float32
    half = a.astype(mx.bfloat16).reshape(4, 1).T
    loss_and_grad = mx.value_and_grad(lambda x: (x * x).sum())
    loss, g = loss_and_grad(a)
    compiled = mx.compile(lambda x, y: x @ y)
    d: Array = compiled(a, a)
    r = mx.random.normal((2, 3), key=mx.random.key(0))
    with device("cpu") as dev, mx.array(np.zeros(3, np.float32)) as t:
        assert dev.type == "cpu" and t.size == 3
    mx.io.save("/tmp/x.npy", a)
    arrays_back = mx.io.load("/tmp/x.npy")
    assert isinstance(arrays_back, Array)
    total = float(host.sum()) + len(shape) + len(parts) + first.size + half.ndim + r.ndim
    return total + float(d[0, 0].item()) + ok + float(loss) + float(g.sum())


def generate(path: str) -> str:
    opts = GenerationOptions(max_tokens=8, temperature=0.7, top_p=0.9, seed=0, stop=["\n"])
    with load(path) as m:
        assert isinstance(m, TextModel)
        text: str = m.generate("The capital of France is", max_tokens=opts.max_tokens)
        for tok in m.stream_chat([{"role": "user", "content": "Hi"}], temperature=opts.temperature):
            text += tok.text
        print(m.metrics().format())
    return text


def engine(m: Model) -> list[int]:
    eng = Engine(m, max_batch=2)
    cache: Cache = eng.make_cache()
    sid = eng.add([1, 2, 3], sampler=Sampler(temperature=0.5, seed=1), max_tokens=4)
    out: list[int] = []
    while eng.has_work():
        for ev in eng.step():
            assert isinstance(ev, Event)
            if ev.seq_id == sid and ev.token >= 0:
                out.append(ev.token)
    cache.free()
    return out
