# cython: language_level=3
# The Cython-level API of mlxcy.generation.sample: token samplers and logit processors
# over native arrays, for generation loops written in Cython.
#
#     from mlxcy.generation.sample cimport Sampler
#     cdef Sampler s = Sampler(temperature=0.7, top_p=0.9, seed=0)
#     # logits: [B, V] (or [V]) floating; history: NULL or integer [T] / [B, T]
#     cdef na.array* tok = s.sample(logits, &history)   # [B] int32, lazy
#     ...   # eval / async_eval tok yourself; then `del tok`
#
# Every function returns a new heap array the caller owns (delete it, or hand
# it to mlxcy.core.wrap()); nothing is evaluated, so a loop can pipeline.
# Filters work along the last axis of any-rank input and mark removed entries
# with -inf; they are invariant to adding a constant per row, so logits and
# log-probabilities give the same kept sets.
from mlxcy.native cimport array as na


cdef class Sampler:
    cdef readonly double temperature        # 0: greedy (argmax)
    cdef readonly int top_k                 # 0: off
    cdef readonly double top_p              # 1: off
    cdef readonly double min_p              # 0: off
    cdef readonly int min_tokens_to_keep
    cdef readonly double repetition_penalty # 1: off
    cdef readonly int repetition_context_size
    cdef readonly double presence_penalty   # 0: off
    cdef readonly int presence_context_size
    cdef readonly double frequency_penalty  # 0: off
    cdef readonly int frequency_context_size
    cdef readonly object seed               # None: key taken from MLX's global sequence
    cdef dict _bias                         # token id -> additive bias
    cdef na.array* key                      # per-sampler key, split at each draw
    cdef na.array* bias_idx                 # [1, n] int32, NULL when no logit_bias
    cdef na.array* bias_val                 # [1, n] float32
    cdef int bias_max                       # largest biased token id

    # Penalties and logit bias (in that order: bias, repetition, presence,
    # frequency, as mlx-lm applies them); `history` may be NULL.
    cdef na.array* process(self, const na.array& logits, const na.array* history) except NULL
    # process(), then greedy argmax or: top-p, min-p, top-k, categorical draw
    # at `temperature` with this step's key. Returns token ids logits.shape[:-1], int32.
    cdef na.array* sample(self, const na.array& logits, const na.array* history) except NULL
    # The filter chain and draw alone, on already processed logits.
    cdef na.array* draw(self, const na.array& logits) except NULL
    cdef na.array* _draw_top_k(self, const na.array& logits) except NULL


# Filters (last axis). k <= 0 or k >= V: unchanged copy. 0 < p <= 1. 0 <= min_p <= 1.
cdef na.array* top_k_filter(const na.array& x, int k) except NULL
cdef na.array* top_p_filter(const na.array& x, double p) except NULL
cdef na.array* min_p_filter(const na.array& x, double min_p, int min_keep) except NULL
