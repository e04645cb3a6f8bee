# Compiled elementwise pieces of the decoder (include/mlxcy/fused.h).
from libcpp.string cimport string
from mlxcy.native.array cimport array, Dtype


cdef extern from "mlxcy/fused.h" namespace "mlxcy" nogil:
    array swiglu(const array& g, const array& u) except +
    array geglu_tanh(const array& g, const array& u) except +
    array last_axis_slice(const array& x, int start, int stop) except +


# Cross-entropy with a hand-written VJP (include/mlxcy/xent.h).
cdef extern from "mlxcy/xent.h" namespace "mlxcy" nogil:
    array token_xent(const array& logits, const array& targets) except +


# Decode-time matrix-vector products with fused norm / bias / activation /
# residual, as mlxcy's own CUDA kernels (include/mlxcy/gpu_gemv.h).
cdef extern from "mlxcy/gpu_gemv.h" namespace "mlxcy" nogil:
    cdef cppclass GemvArgs:
        GemvArgs()
        const array* scales
        const array* qbiases
        int bits
        int group_size
        const array* bias
        const array* norm
        float eps
        const array* residual
        int act
    bint gemv_supported(const array& x, const array& w, const GemvArgs& a,
                        string* why) except +
    bint gemv_supported(Dtype t, int K, long rows, const array& w, const GemvArgs& a,
                        string* why) except +
    array gemv(const array& x, const array& w, const GemvArgs& a) except +
    int& gemv_max_rows()
