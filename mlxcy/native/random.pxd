# Declarations of MLX's random number generators (mlx/random.h) through the
# pointer-based shims of include/mlxcy/random.h: a NULL key pointer means "use
# the global key sequence", a NULL shape means "the shape of the inputs".
from libc.stdint cimport uint64_t
from mlxcy.native.array cimport array, Dtype, Shape


cdef extern from "mlxcy/random.h" namespace "mlxcy::rnd" nogil:
    array key(uint64_t seed) except +
    void seed(uint64_t seed) except +
    array split(const array& key, int num) except +
    array bits(const Shape& shape, int width, const array* key) except +
    array uniform(const array& low, const array& high, const Shape& shape, Dtype dtype,
                  const array* key) except +
    array normal(const Shape& shape, Dtype dtype, const array* loc, const array* scale,
                 const array* key) except +
    array randint(const array& low, const array& high, const Shape& shape, Dtype dtype,
                  const array* key) except +
    array bernoulli(const array& p, const Shape* shape, const array* key) except +
    array truncated_normal(const array& lower, const array& upper, const Shape* shape,
                           Dtype dtype, const array* key) except +
    array gumbel(const Shape& shape, Dtype dtype, const array* key) except +
    array laplace(const Shape& shape, Dtype dtype, float loc, float scale,
                  const array* key) except +
    array categorical(const array& logits, int axis, const array* key) except +
    array categorical_shape(const array& logits, int axis, const Shape& shape,
                            const array* key) except +
    array categorical_n(const array& logits, int axis, int num_samples,
                        const array* key) except +
    array permutation(const array& x, int axis, const array* key) except +
    array permutation_n(int n, const array* key) except +
