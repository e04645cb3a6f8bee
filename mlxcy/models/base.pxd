# cython: language_level=3
# What every mlxcy decoder offers at the Cython level.
#
#   cdef na.array* Model.forward(self, const na.array& ids, Cache cache,
#                                const na.array* mask, const na.array* offsets,
#                                bint last_only) except NULL
#
# ids: int32 [B, L]. cache: a Cache from make_cache() (or None: no state kept).
# mask: NULL, or a mask broadcastable to [B, 1 or heads, L, cache.offset + L]
#   over absolute key positions, boolean (True = attend) or additive (added
#   to the scores); it is combined with the causal (and sliding-window) mask,
#   e.g. to hide the left padding of a batch.
# offsets: NULL, or int32 [B]: per-sequence RoPE position of the first of the
#   L new tokens (for left-padded batches; default: the cache offset).
# last_only: compute the final norm and the lm_head for the last position only.
# Returns a new heap array [B, L or 1, vocab] that the caller owns.
from mlxcy.native cimport array as na
from mlxcy.core cimport Array
from mlxcy.nn cimport Linear, Embedding, RMSNorm
from mlxcy.models.cache cimport LayerCache, Cache


cdef class Rope:
    cdef int dims
    cdef float base                # <= 0 when freqs are given
    cdef float scale               # positions are multiplied by scale (linear: 1/factor)
    cdef na.array* freqs           # custom periods (1 / inv_freq), e.g. llama3
    cdef double dyn_factor         # > 0: dynamic NTK scaling
    cdef int dyn_max_pos
    cdef na.array* apply(self, const na.array& x, int offset, const na.array* offsets) except NULL
    cpdef free(self)


cdef class Attention:
    cdef Linear q_proj, k_proj, v_proj, o_proj
    cdef Linear qkv_proj           # fused q/k/v (then q/k/v_proj are None), see Model.fuse()
    cdef RMSNorm q_norm, k_norm    # None unless the family normalizes q/k per head
    cdef Array qk_norm_w           # [H + Hkv, 1, D]: q_norm's weight per q head, k_norm's
                                   # per k head (set by fuse(): one norm over q and k heads)
    cdef Rope rope
    cdef int n_heads, n_kv_heads, head_dim, window
    cdef float scale, softcap      # softcap <= 0: none
    cdef na.array* forward(self, const na.array& x, LayerCache cache, const na.array* mask,
                           const na.array* offsets) except NULL
    # up to o_proj
    cdef na.array* core(self, const na.array& x, LayerCache cache, const na.array* mask,
                        const na.array* offsets) except NULL
    cdef na.array* attend(self, const na.array& q, const na.array& k, const na.array& v,
                          int L, int qstart, int kstart, int window,
                          const na.array* mask) except NULL
    cpdef free(self)


cdef class MLP:
    cdef Linear gate_proj, up_proj, down_proj
    cdef Linear gate_up_proj       # fused gate/up (then gate/up_proj are None)
    cdef bint gelu                 # gelu-tanh (Gemma) instead of SiLU
    cdef na.array* forward(self, const na.array& x) except NULL
    cdef na.array* hidden(self, const na.array& x) except NULL        # up to down_proj
    cpdef free(self)


cdef class Block:
    cdef Attention attn
    cdef MLP mlp
    cdef RMSNorm input_norm, post_attn_norm, pre_ff_norm, post_ff_norm
    cdef na.array* forward(self, const na.array& x, LayerCache cache, const na.array* mask,
                           const na.array* offsets) except NULL
    cpdef free(self)


cdef class Model:
    cdef readonly object config
    cdef Embedding embed
    cdef list layers
    cdef RMSNorm norm
    cdef Linear lm_head            # None when tied to the embedding
    cdef bint is_closed
    cdef dict quant
    cdef int dtype_code
    cdef object gpu_step           # None: not planned yet; False: not eligible; else _GpuStep
    cdef na.array* forward(self, const na.array& ids, Cache cache, const na.array* mask,
                           const na.array* offsets, bint last_only) except NULL
    cdef int _check_open(self) except -1
    cdef na.array* embed_tokens(self, const na.array& ids) except NULL
    cdef na.array* head(self, const na.array& h) except NULL   # final norm + output projection
    cdef na.array* project(self, const na.array& n) except NULL   # output projection only


# One-token CPU step of a block by mlxcy.cpu_kernels' block primitives (sandwich:
# Gemma's extra norms); False (nothing done) when it does not apply.
cdef bint cpu_block_step(Block blk, const na.array& x, LayerCache cache, const na.array* mask,
                         const na.array* offsets, bint sandwich, na.array** out) except -1


# A batch's one-token step (ids [B, 1], rows left-padded: rpos int32 [B], each
# row's rotary position; NULL: none padded) as the one-kernel GPU step; False
# (nothing done) when it does not apply.
cdef bint gpu_rows_step(Model m, const na.array& ids, Cache cache, const na.array* rpos,
                        na.array** out) except -1
