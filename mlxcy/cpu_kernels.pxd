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

# Attention over the cache, one position or a causal prompt
# (include/mlxcy/cpu_attention.h).
cdef bint use_attention(const na.array& q, const na.array& k, const na.array& v,
                        const na.array* mask) noexcept
cdef na.array* cpu_attention(const na.array& q, const na.array& k, const na.array& v,
                             float scale, bint causal, const na.array* mask) except NULL

# act(gate) * up of the MLP (act 0: SiLU, 1: GELU tanh; include/mlxcy/cpu_act.h).
cdef bint use_activation(const na.array& g, const na.array& u) noexcept
cdef na.array* cpu_activation(const na.array& g, const na.array& u, int act) except NULL

# The most positions per sequence that the kernels treat as a step (include/mlxcy/cpu_quant.h).
cdef extern from "mlxcy/cpu_quant.h" namespace "mlxcy::cpu" nogil:
    const int kStepPositions

# Is the CPU kernels' decode-step path on (enabled, default device the CPU)?
cdef bint use_block_kernels() noexcept

# A decode step of a pre-norm block in two primitives (include/mlxcy/cpu_block.h):
# models/base.pyx fills a LinearArg per layer and calls these for one-token steps.
# (Called through this module, never inlined elsewhere: the kernels' settings and
# thread pool are statics of the one shared object that holds the C++ code.)
from libcpp.vector cimport vector

cdef extern from "mlxcy/cpu_block.h" namespace "mlxcy::cpu" nogil:
    cdef cppclass LinearArg:
        LinearArg()
        const na.array* w
        const na.array* scales
        const na.array* biases
        const na.array* bias
        int gs
        int bits

cdef bint block_qkv_ok(const na.array& x, const na.array& norm_w,
                       const vector[LinearArg]& parts, int H, int Hkv, int D, int rope_dims,
                       const na.array* freqs, const na.array* q_norm,
                       const na.array* k_norm, const na.array* offsets) noexcept
cdef int block_qkv_run(vector[na.array]& out, const na.array& x, const na.array& norm_w,
                       float eps, const vector[LinearArg]& parts, int H, int Hkv, int D,
                       int rope_dims, float rope_base, float rope_scale, const na.array* freqs,
                       const na.array* q_norm, const na.array* k_norm, float qk_eps,
                       int offset, const na.array* offsets) except -1
cdef bint block_mlp_ok(const na.array& x, int HD, const LinearArg& o, const na.array* norm_o,
                       const na.array& norm_mid, const vector[LinearArg]& gate_up,
                       const LinearArg& down, const na.array* norm_mlp) noexcept
cdef na.array* block_attn_mlp_run(const na.array& q, const na.array& k, const na.array& v,
                                  const na.array& x, float attn_scale, const LinearArg& o,
                                  const na.array* norm_o, float eps_o, const na.array& norm_mid,
                                  float eps_mid, const vector[LinearArg]& gate_up,
                                  const LinearArg& down, const na.array* norm_mlp,
                                  float eps_mlp, int act, const na.array* mask) except NULL
