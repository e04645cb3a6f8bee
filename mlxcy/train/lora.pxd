# cython: language_level=3
from libcpp.vector cimport vector
from mlxcy.native cimport array as na
from mlxcy.models.base cimport Model


cdef class LoRA:
    cdef readonly Model model
    cdef readonly list names        # module paths: model.layers.N.self_attn.q_proj
    cdef list layers                # the Linear of each name
    cdef list block_of              # block index of each name
    cdef vector[na.array]* params   # [A0, B0, A1, B1, ...] master copies
    cdef readonly int rank
    cdef readonly double scale, dropout
    cdef readonly tuple keys
    cdef readonly int num_layers
    cdef readonly bint merged
    cdef int compute_code           # dtype code adapters are cast to in forward; -1: as stored
    cdef dict originals             # merge(): name -> original base arrays
    cdef readonly str fine_tune_type    # "lora", "dora" or "full"
    cdef readonly int per           # arrays in params per adapted unit (2, 3 or 1)
    cdef list bases                 # dora: each layer's base arrays (its weight as built)
    cdef list dweights              # dora: each layer's float base weight [out, in]
    cdef list kinds                 # full: 0 Linear weight, 1 Linear bias, 2 RMSNorm weight
    cdef list offsets               # full: a norm's stored offset ((1 + w) norms)
    cdef list codes                 # full: each tensor's dtype (mlxcy Dtype) in the model
    cdef int _install(self, const vector[na.array]& p) except -1
    cdef int _install_range(self, const vector[na.array]& p, size_t off, size_t first,
                            size_t count) except -1
    cdef int _install_dora(self, size_t j, const na.array& a, const na.array& b,
                           const na.array& m) except -1
    cdef int _install_full(self, size_t j, const na.array& t) except -1


cdef vector[na.array] masked_ce(const na.array& logits, const na.array& targets,
                                const na.array& mask) except *
