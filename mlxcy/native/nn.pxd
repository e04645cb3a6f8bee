# Native declarations used by mlxcy's layers, caches and models: ops that
# mlxcy/native/ops.pxd does not (yet) declare, and the shims of
# include/mlxcy/nn.h. Duplicates of other native .pxd files are harmless.
from libcpp cimport bool
from libcpp.vector cimport vector
from mlxcy.native.array cimport array, Dtype, Shape


cdef extern from "mlx/ops.h" namespace "mlx::core" nogil:
    array tanh(const array&) except +
    array sigmoid(const array&) except +
    array sqrt(const array&) except +
    array square(const array&) except +
    array exp(const array&) except +
    array take(const array&, const array&, int) except +
    array take(const array&, const array&) except +
    array slice(const array&, Shape, Shape) except +
    array slice_update(const array&, const array&, Shape, Shape) except +
    array concatenate(vector[array], int) except +
    array zeros(const Shape&, Dtype) except +
    array astype(array, Dtype) except +
    array where(const array&, const array&, const array&) except +
    array logical_and(const array&, const array&) except +
    array reshape(const array&, Shape) except +
    array transpose(const array&, vector[int]) except +
    array matmul(const array&, const array&) except +
    array multiply(const array&, const array&) except +
    array add(const array&, const array&) except +
    array power(const array&, const array&) except +
    array divide(const array&, const array&) except +
    array broadcast_to(const array&, const Shape&) except +
    array repeat(const array&, int, int) except +
    array expand_dims(const array&, int) except +
    array min(const array&, bool) except +
    array max(const array&, bool) except +
    array contiguous(const array&, bool) except +
    array arange(double, double, double, Dtype) except +


cdef extern from "mlxcy/nn.h" namespace "mlxcy" nogil:
    array own(array*) except +
    array linear(const array& x, const array& w, const array* bias) except +
    array heads_slice(const array& x, int h0, int h1) except +
    array rows(const array& a, int r0, int r1) except +
    array qlinear(const array& x, const array& w, const array& scales, const array* biases,
                  int group_size, int bits, const array* bias) except +
    array dequantize(const array& w, const array& scales, const array* biases,
                     int group_size, int bits) except +
    vector[array] quantize(const array& w, int group_size, int bits) except +
    array softmax_last(const array& x, bool precise) except +
    array gelu_tanh(const array& x) except +
    array silu(const array& x) except +
    array softcap(const array& x, float cap) except +
    array scalar(double v, Dtype dt) except +
    array arange_i(int start, int stop) except +
    array causal_window_mask(int L, int qstart, int K, int kstart, int window) except +
    array slice_t(const array& x, int t0, int t1) except +
    array cat_t(const array& a, const array& b) except +
    array grow_t(const array& buf, int used, int extra) except +
    array unroll_t(const array& ring, int idx) except +
    array write_t(const array& buf, const array& upd, int t0) except +
    array zeros4(int a, int b, int c, int d, Dtype dt) except +
    bool same_dtype(const array& a, const array& b)
    array heads_first(const array& x, int H, int D) except +
    array heads_merge(const array& x) except +
    array take_position(const array& x, int t) except +
    bool build_mask(int kind, int L, int qstart, int K, int kstart, int window,
                    const array* user, Dtype dt, bool allow_causal_mode,
                    bool* causal_mode, array* out) except +
    array attention_softcap(const array& q, const array& k, const array& v, float scale,
                            float cap, const array* mask) except +
    size_t active_memory() except +
    void clear_memory_cache() except +
