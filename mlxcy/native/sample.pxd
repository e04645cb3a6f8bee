# Native declarations used by mlxcy/sample.pyx: the mlx/ops.h functions the
# samplers need (some duplicate native/ops.pxd, which is fine) and the
# pointer-based shims of include/mlxcy/sample.h.
from libc.stdint cimport uint64_t
from libcpp cimport bool
from mlxcy.native.array cimport array, Dtype, Shape


cdef extern from "mlx/ops.h" namespace "mlx::core" nogil:
    array zeros(const Shape&, Dtype) except +
    array astype(array, Dtype) except +
    array reshape(const array&, Shape) except +
    array broadcast_to(const array&, const Shape&) except +
    array slice(const array&, Shape, Shape) except +
    array add(const array&, const array&) except +
    array subtract(const array&, const array&) except +
    array multiply(const array&, const array&) except +
    array divide(const array&, const array&) except +
    array minimum(const array&, const array&) except +
    array less(const array&, const array&) except +
    array greater(const array&, const array&) except +
    array greater_equal(const array&, const array&) except +
    array logical_and(const array&, const array&) except +
    array where(const array&, const array&, const array&) except +
    array exp(const array&) except +
    array max(const array&, int axis, bool keepdims) except +
    array sum(const array&, int axis, bool keepdims) except +
    array argmax(const array&, int axis, bool keepdims) except +
    array logsumexp(const array&, int axis, bool keepdims) except +
    array sort(const array&, int axis) except +
    array partition(const array&, int kth, int axis) except +
    array argpartition(const array&, int kth, int axis) except +
    array negative(const array&) except +
    array take_along_axis(const array&, const array&, int axis) except +
    array scatter_add_axis(const array&, const array&, const array&, int axis) except +


cdef extern from "mlxcy/sample.h" namespace "mlxcy::smp" nogil:
    array cumsum(const array& a, int axis, bool reverse, bool inclusive) except +
    array categorical(const array& logits, int axis, const array* key) except +
    array categorical_step(const array& logits, double inv_temp, array* key) except +
    array key_from_global() except +
    array key(uint64_t seed) except +
    array next_key(array* key) except +
