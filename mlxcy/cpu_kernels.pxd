# cython: language_level=3
# mlxcy's CPU kernels for linear layers (include/mlxcy/cpu_quant.h), as an
# MLX primitive; mlxcy/nn.pyx calls `linear` for layers on the CPU.
from mlxcy.native cimport array as na


# Should x @ W.T of this layer run on mlxcy's CPU kernels?  (The default device
# is the CPU, the kernels are enabled and support the bits/group size/dtypes.)
cdef bint use_kernels(const na.array& x, const na.array& w, const na.array* scales,
                      int group_size, int bits) noexcept

# x @ dequantize(w).T (+ bias), or x @ w.T (+ bias) when scales is NULL.
cdef na.array* cpu_linear(const na.array& x, const na.array& w, const na.array* scales,
                      const na.array* biases, int group_size, int bits,
                      const na.array* bias) except NULL

# One-position attention over the cache (include/mlxcy/cpu_attention.h).
cdef bint use_attention(const na.array& q, const na.array& k, const na.array& v) noexcept
cdef na.array* cpu_decode_attention(const na.array& q, const na.array& k, const na.array& v,
                                    float scale) except NULL
