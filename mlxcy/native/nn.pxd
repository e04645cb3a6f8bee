# Native declarations used by mlxcy's layers, caches and models: the mlx/ops.h
# functions they call (declared in native/ops.pxd, cimported here so that
# `nnn.add(...)` works) and the shims of include/mlxcy/nn.h.
from libcpp cimport bool
from libcpp.vector cimport vector
from mlxcy.native.array cimport array, Dtype, Shape
from mlxcy.native.ops cimport (
    tanh, sigmoid, sqrt, square, exp, take, slice, slice_update, concatenate, zeros, astype,
    where, logical_and, reshape, transpose, matmul, multiply, add, power, divide,
    broadcast_to, repeat, expand_dims, min, max, contiguous, arange,
)


cdef extern from "mlxcy/nn.h" namespace "mlxcy" nogil:
    array own(array*) except +
    array linear(const array& x, const array& w, const array* bias) except +
    array heads_slice(const array& x, int h0, int h1) except +
    array rows(const array& a, int r0, int r1) except +
    array qlinear(const array& x, const array& w, const array& scales, const array* biases,
                  int group_size, int bits, const array* bias) except +
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


# Quantized products on the CPU (include/mlxcy/qcpu.h).
cdef extern from "mlxcy/qcpu.h" namespace "mlxcy" nogil:
    array qlinear_dequant(const array& x, const array& w, const array& scales,
                          const array* biases, int group_size, int bits,
                          const array* bias, int block, bool eval_blocks) except +
    void eval_now(const array&) except +
