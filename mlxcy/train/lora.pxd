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
    cdef int _install(self, const vector[na.array]& p) except -1
    cdef int _install_range(self, const vector[na.array]& p, size_t off, size_t first,
                            size_t count) except -1


cdef vector[na.array] masked_ce(const na.array& logits, const na.array& targets,
                                const na.array& mask) except *
