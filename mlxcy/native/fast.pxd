# Declarations of MLX's fused kernels (mlx/fast.h) through the pointer-based
# shims of include/mlxcy/fast.h: a NULL array pointer means "not given".
from libcpp cimport bool
from libcpp.string cimport string
from mlxcy.native.array cimport array


cdef extern from "mlxcy/fast.h" namespace "mlxcy" nogil:
    array rms_norm(const array& x, const array* weight, float eps) except +
    array layer_norm(const array& x, const array* weight, const array* bias, float eps) except +
    array rope(const array& x, int dims, bool traditional, float base, float scale,
               int offset, const array* freqs) except +
    array rope_offsets(const array& x, int dims, bool traditional, float base, float scale,
                       const array& offset, const array* freqs) except +
    array sdpa(const array& q, const array& k, const array& v, float scale,
               const string& mask_mode, const array* mask, const array* sinks) except +
