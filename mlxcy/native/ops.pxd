# Declarations mirroring mlx/ops.h: the one place an mlx/ops.h function is
# declared (native/nn.pxd and native/sample.pxd cimport what their modules use
# from here).  Every op takes an optional trailing StreamOrDevice in C++; we
# leave it out, so ops run on the default stream.
from libcpp cimport bool
from libcpp.string cimport string
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
    vector[array] broadcast_arrays(const vector[array]&) except +

    # creation
    array full(Shape, array) except +
    array full_like(const array&, array, Dtype) except +
    array zeros_like(const array&) except +
    array ones_like(const array&) except +
    array arange(double, double, double, Dtype) except +
    array linspace(double, double, int, bool, Dtype) except +
    array eye(int, int, int, Dtype) except +
    array identity(int, Dtype) except +
    array tri(int, int, int, Dtype) except +
    array tril(array, int) except +
    array triu(array, int) except +

    # elementwise
    array logical_xor(const array&, const array&) except +
    array logaddexp(const array&, const array&) except +
    array arctan2(const array&, const array&) except +
    array sign(const array&) except +
    array reciprocal(const array&) except +
    array floor(const array&) except +
    array ceil(const array&) except +
    array trunc(const array&) except +
    array square(const array&) except +
    array sqrt(const array&) except +
    array rsqrt(const array&) except +
    array exp(const array&) except +
    array expm1(const array&) except +
    array log(const array&) except +
    array log1p(const array&) except +
    array log2(const array&) except +
    array log10(const array&) except +
    array sin(const array&) except +
    array cos(const array&) except +
    array tan(const array&) except +
    array arcsin(const array&) except +
    array arccos(const array&) except +
    array arctan(const array&) except +
    array sinh(const array&) except +
    array cosh(const array&) except +
    array tanh(const array&) except +
    array arcsinh(const array&) except +
    array arccosh(const array&) except +
    array arctanh(const array&) except +
    array sigmoid(const array&) except +
    array erf(const array&) except +
    array erfinv(const array&) except +
    array round(const array&, int) except +
    array isnan(const array&) except +
    array isinf(const array&) except +
    array isfinite(const array&) except +
    array array_equal(const array&, const array&, bool) except +
    array allclose(const array&, const array&, double, double, bool) except +
    array isclose(const array&, const array&, double, double, bool) except +
    array stop_gradient(const array&) except +

    # shape
    array squeeze(const array&) except +
    array flatten(const array&) except +
    array swapaxes(const array&, int, int) except +
    array moveaxis(const array&, int, int) except +
    vector[array] split(const array&, int, int) except +
    vector[array] split(const array&, const Shape&, int) except +
    array tile(const array&, vector[int]) except +
    array repeat(const array&, int, int) except +
    array repeat(const array&, int) except +
    array pad(const array&, const vector[int]&, const Shape&, const Shape&, const array&,
              const string&) except +
    array slice(const array&, const array&, vector[int], Shape) except +
    array slice_update(const array&, const array&, const array&, vector[int]) except +
    array take_along_axis(const array&, const array&, int) except +
    array put_along_axis(const array&, const array&, const array&, int) except +
    array scatter_add(const array&, const vector[array]&, const array&,
                      const vector[int]&) except +
    array scatter_add_axis(const array&, const array&, const array&, int) except +
    array flip(const array&, const vector[int]&) except +
    array flip(const array&) except +
    array diag(const array&, int) except +
    array diagonal(const array&, int, int, int) except +

    # reductions: over the given axes, over one axis, or over all (keepdims)
    array sum(const array&, const vector[int]&, bool) except +
    array sum(const array&, int, bool) except +
    array mean(const array&, const vector[int]&, bool) except +
    array prod(const array&, const vector[int]&, bool) except +
    array max(const array&, const vector[int]&, bool) except +
    array max(const array&, int, bool) except +
    array max(const array&, bool) except +
    array min(const array&, const vector[int]&, bool) except +
    array min(const array&, bool) except +
    array all(const array&, const vector[int]&, bool) except +
    array any(const array&, const vector[int]&, bool) except +
    array logsumexp(const array&, const vector[int]&, bool) except +
    array logsumexp(const array&, int, bool) except +
    array var(const array&, const vector[int]&, bool, int) except +
    array argmax(const array&, bool) except +
    array argmax(const array&, int, bool) except +
    array argmin(const array&, bool) except +
    array argmin(const array&, int, bool) except +
    array cumsum(const array&, int, bool, bool) except +
    array cumprod(const array&, int, bool, bool) except +
    array cummax(const array&, int, bool, bool) except +
    array cummin(const array&, int, bool, bool) except +
    array softmax(const array&, const vector[int]&, bool) except +

    # linear algebra
    array addmm(array, array, array, const float&, const float&) except +
    array inner(const array&, const array&) except +
    array outer(const array&, const array&) except +
    array tensordot(const array&, const array&, int) except +
    array tensordot(const array&, const array&, const vector[int]&,
                    const vector[int]&) except +

    # sort and select
    array sort(const array&) except +
    array sort(const array&, int) except +
    array argsort(const array&) except +
    array argsort(const array&, int) except +
    array partition(const array&, int) except +
    array partition(const array&, int, int) except +
    array argpartition(const array&, int) except +
    array argpartition(const array&, int, int) except +
    array topk(const array&, int) except +
    array topk(const array&, int, int) except +


cdef extern from "mlx/einsum.h" namespace "mlx::core" nogil:
    array einsum(const string&, const vector[array]&) except +


# Shims for optional arguments (include/mlxcy/ops.h): NULL array pointer =
# absent, group_size/bits <= 0 = the mode's default, dtype code -1 = absent.
cdef extern from "mlxcy/ops.h" nogil:
    # std clashes with the C++ namespace name, so it is declared by its full name.
    array std_ "mlx::core::std"(const array&, const vector[int]&, bool, int) except +
    array clip_ "mlxcy::clip"(const array&, const array*, const array*) except +
    array nan_to_num_ "mlxcy::nan_to_num"(const array&, float, const float*,
                                            const float*) except +
    vector[array] quantize_ "mlxcy::quantize"(const array&, int, int, const string&) except +
    array dequantize_ "mlxcy::dequantize"(const array&, const array&, const array*, int, int,
                                            const string&, int) except +
    array quantized_matmul_ "mlxcy::quantized_matmul"(const array&, const array&,
                                                        const array&, const array*, bool,
                                                        int, int, const string&) except +
    array gather_mm_ "mlxcy::gather_mm"(const array&, const array&, const array*,
                                          const array*, bool) except +
    array gather_qmm_ "mlxcy::gather_qmm"(const array&, const array&, const array&,
                                            const array*, const array*, const array*, bool,
                                            int, int, const string&, bool) except +
