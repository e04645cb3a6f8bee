"""Types of mlxcy.random (random.pyx): MLX's counter-based PRNG.

`key` arguments take a key from key() or split() (None: MLX's global key
sequence, seeded by seed())."""
from mlxcy.core import Array, _ArrayLike, _DtypeLike, _ShapeLike

def seed(s: int) -> None: ...
def key(s: int) -> Array:
    """A PRNG key (uint32 array of shape (2,)) derived from the integer seed `s`."""
def split(key: _ArrayLike, num: int = 2) -> Array:
    """`num` new keys: a uint32 array of shape (num, 2)."""
def bits(shape: _ShapeLike = (), width: int = 4, key: _ArrayLike | None = None) -> Array: ...
def uniform(
    low: _ArrayLike = 0.0,
    high: _ArrayLike = 1.0,
    shape: _ShapeLike = (),
    dtype: _DtypeLike = "float32",
    key: _ArrayLike | None = None,
) -> Array: ...
def normal(
    shape: _ShapeLike = (),
    dtype: _DtypeLike = "float32",
    loc: _ArrayLike | None = None,
    scale: _ArrayLike | None = None,
    key: _ArrayLike | None = None,
) -> Array: ...
def randint(
    low: _ArrayLike, high: _ArrayLike, shape: _ShapeLike = (), dtype: _DtypeLike = "int32", key: _ArrayLike | None = None
) -> Array: ...
def bernoulli(p: _ArrayLike = 0.5, shape: _ShapeLike | None = None, key: _ArrayLike | None = None) -> Array: ...
def truncated_normal(
    lower: _ArrayLike,
    upper: _ArrayLike,
    shape: _ShapeLike | None = None,
    dtype: _DtypeLike = "float32",
    key: _ArrayLike | None = None,
) -> Array: ...
def gumbel(shape: _ShapeLike = (), dtype: _DtypeLike = "float32", key: _ArrayLike | None = None) -> Array: ...
def laplace(
    shape: _ShapeLike = (),
    dtype: _DtypeLike = "float32",
    loc: float = 0.0,
    scale: float = 1.0,
    key: _ArrayLike | None = None,
) -> Array: ...
def categorical(
    logits: _ArrayLike,
    axis: int = -1,
    shape: _ShapeLike | None = None,
    num_samples: int | None = None,
    key: _ArrayLike | None = None,
) -> Array: ...
def permutation(x: int | _ArrayLike, axis: int = 0, key: _ArrayLike | None = None) -> Array: ...
