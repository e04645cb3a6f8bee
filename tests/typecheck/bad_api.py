"""Misuses of mlxcy's public API that mypy must reject with the stubs: each
line marked `# E: <code>` must get exactly that error, and no other line any
(tests/test_stubs.py).  A type checker that saw Any everywhere would pass the
good script but not this one.  Never run."""
import mlxcy as mx
from mlxcy import GenerationOptions, load
from mlxcy.generation.engine import Engine

a = mx.array([1.0, 2.0])
s: str = a.shape  # E: assignment
mx.softmax(a, axis="last")  # E: arg-type
mx.no_such_op(a)  # E: attr-defined
with load("model.gguf") as m:
    m.generate(123)  # E: arg-type
GenerationOptions(max_tokens="8")  # E: arg-type
n: int = mx.split(a, 2)  # E: assignment
a.free(1)  # E: call-arg
mx.random.normal((2, 2), dtype=mx.float32, key="k")  # E: arg-type
Engine(a)  # E: arg-type
b: bool = mx.allclose(a, a)  # E: assignment
