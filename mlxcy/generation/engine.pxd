# cython: language_level=3
# The engine's native helpers, for Cython code that runs a model over
# left-padded rows (mlxcy.generation.batch's classify) or extends the engine.
from libcpp.vector cimport vector

from mlxcy.native cimport array as na
from mlxcy.models.base cimport Model
from mlxcy.models.cache cimport Cache
from mlxcy.generation.sample cimport Sampler

# model.forward over a chunk of left-padded rows whose first column sits at
# padded position `off` (pads: int32 [B], or NULL when no row is padded).
cdef na.array* padded_forward(Model model, const na.array& ids, Cache cache, const na.array* pads,
                              int off, bint last_only) except NULL
# float32 log-softmax over the last axis
cdef na.array* log_softmax(const na.array& x) except NULL
# every layer's key/value buffers, to evaluate after a cache-only forward
cdef void _cache_arrays(Cache cache, vector[na.array]& out) except *
# how many recent tokens a sampler's penalties look at (0: none)
cdef int history_size(Sampler s)
cpdef object check_ids(ids, int vocab, str what, bint empty=*)
