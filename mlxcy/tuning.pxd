# cython: language_level=3
# The live tuning knobs (mlxcy/tuning.pyx) as one C struct, so that Cython hot
# paths read them with no Python call:
#
#     from mlxcy.tuning cimport Tuning, current
#     cdef Tuning* _tuning = current()      # once, at module import
#     ...
#     if _tuning.cpu_sync: ...
#
# Only mlxcy.tuning writes the struct (through its set/override/reset).


cdef struct Tuning:
    bint cpu_sync               # quantized CPU inference evaluates block by block
    int cache_pad               # spare positions in every newly allocated KV-cache buffer
    int prefill_split           # -1: automatic (on the CPU); 0: never; 1: always
    int prefill_chunk_cpu       # default prompt tokens per prefill step on the CPU
    int prefill_chunk_gpu       # ... and on a GPU
    bint lookup_chain           # prompt lookup queues a verification ahead
    int lookup_adapt            # -1: automatic (not where the GPU kernel verifies); 0: no; 1: yes


cdef Tuning* current() noexcept nogil
