# cython: language_level=3
# KV caches over native arrays, layout [B, n_kv_heads, T, head_dim].
#
# A model's attention calls `c.update(keys, values, ordered)` with the new
# (already rotated) keys/values of L positions; afterwards `c.out_k`/`c.out_v`
# (owned by the cache, valid until the next update) hold the keys/values to
# attend over and `c.out_start` the position of their first key -- or -1 when
# a rotating cache returned its ring unordered (only for L == 1 with
# ordered=False, when every held key is inside the window, so order does not
# matter to attention). `c.offset` counts positions processed so far.
from mlxcy.native cimport array as na


cdef class LayerCache:
    cdef na.array* keys
    cdef na.array* values
    cdef na.array* out_k
    cdef na.array* out_v
    cdef readonly int offset
    cdef int out_start
    cdef readonly int window      # 0: unbounded (KVCache); W: keeps the last W positions
    cdef readonly int step
    cdef int update(self, const na.array& k, const na.array& v, bint ordered) except -1
    cdef void drop_outputs(self) noexcept
    cpdef free(self)
    cpdef trim(self, int n)
    cpdef long long nbytes(self)


cdef class KVCache(LayerCache):
    pass


cdef class RotatingKVCache(LayerCache):
    cdef int filled               # valid slots in the buffer
    cdef int idx                  # next write slot (oldest entry once the ring is full)
    cdef void _store_ordered(self, const na.array& k, const na.array& v, int keep) except *


cdef class Cache:
    cdef readonly list layers
    cpdef free(self)
