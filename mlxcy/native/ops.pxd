# Declarations mirroring mlx/ops.h. Every op takes an optional trailing
# StreamOrDevice in C++; we leave it out, so ops run on the default stream.
from libcpp cimport bool
from libcpp.vector cimport vector
from mlxcy.native.array cimport array, Dtype, Shape


cdef extern from "mlx/ops.h" namespace "mlx::core" nogil:
    # creation
    array zeros(const Shape&, Dtype) except +
    array ones(const Shape&, Dtype) except +
    array full(Shape, array, Dtype) except +
    array astype(array, Dtype) except +
    array view(const array&, const Dtype&) except +
    array copy(array) except +
    array contiguous(const array&, bool) except +

    # arithmetic and comparison
    array add(const array&, const array&) except +
    array subtract(const array&, const array&) except +
    array multiply(const array&, const array&) except +
    array divide(const array&, const array&) except +
    array floor_divide(const array&, const array&) except +
    array remainder(const array&, const array&) except +
    array power(const array&, const array&) except +
    array maximum(const array&, const array&) except +
    array minimum(const array&, const array&) except +
    array equal(const array&, const array&) except +
    array not_equal(const array&, const array&) except +
    array greater(const array&, const array&) except +
    array greater_equal(const array&, const array&) except +
    array less(const array&, const array&) except +
    array less_equal(const array&, const array&) except +
    array logical_not(const array&) except +
    array logical_and(const array&, const array&) except +
    array logical_or(const array&, const array&) except +
    array bitwise_and(const array&, const array&) except +
    array bitwise_or(const array&, const array&) except +
    array bitwise_xor(const array&, const array&) except +
    array bitwise_invert(const array&) except +
    array left_shift(const array&, const array&) except +
    array right_shift(const array&, const array&) except +
    array negative(const array&) except +
    array abs(const array&) except +
    array matmul(const array&, const array&) except +

    # shape
    array reshape(const array&, Shape) except +
    array transpose(const array&, vector[int]) except +
    array transpose(const array&) except +
    array expand_dims(const array&, int) except +
    array expand_dims(const array&, const vector[int]&) except +
    array squeeze(const array&, int) except +
    array squeeze(const array&, const vector[int]&) except +
    array broadcast_to(const array&, const Shape&) except +
    array slice(const array&, Shape, Shape, Shape) except +
    array slice(const array&, Shape, Shape) except +
    array slice_update(const array&, const array&, Shape, Shape, Shape) except +
    array take(const array&, const array&, int) except +
    array take(const array&, const array&) except +
    array take(const array&, int, int) except +
    array gather(const array&, const vector[array]&, const vector[int]&, const Shape&) except +
    array scatter(const array&, const vector[array]&, const array&, const vector[int]&) except +
    array where(const array&, const array&, const array&) except +
    array flatten(const array&, int, int) except +
    array concatenate(vector[array], int) except +
    array concatenate(vector[array]) except +
    array stack(const vector[array]&, int) except +
