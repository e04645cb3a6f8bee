# cython: language_level=3
# Layers as cdef classes holding native arrays (heap pointers owned by the
# layer, released by free() or on collection). Their `forward` methods are
# cdef: they take native arrays and return a new heap array (the caller owns
# it; `mlxcy.native.nn.own(p)` turns it back into a value).
from mlxcy.native cimport array as na


# Quantized layers on the CPU: evaluate each dequantized block's product before
# building the next (see EVAL_BLOCKS in nn.pyx); returns the previous setting.
cdef bint set_eval_blocks(bint on) noexcept


cdef class Linear:
    cdef na.array* weight      # [out, in] float, or packed uint32 when quantized
    cdef na.array* scales      # quantized only
    cdef na.array* qbiases     # quantized only (affine biases)
    cdef na.array* bias        # optional additive bias [out]
    cdef readonly int in_features, out_features, bits, group_size
    cdef readonly bint quantized
    # Optional LoRA adapter (mlxcy.train.lora): y = base(x) + scale * (drop(x) @ A) @ B.
    # NULL when no adapter is set (forward is then exactly the plain layer).
    cdef na.array* lora_a      # [in, r]
    cdef na.array* lora_b      # [r, out]
    cdef public float lora_scale
    cdef public float lora_dropout
    cdef public bint training  # dropout only while training
    cdef na.array* forward(self, const na.array& x) except NULL
    cdef na.array* forward_rows(self, const na.array& x, int r0, int r1) except NULL
    cdef na.array* lora_forward(self, const na.array& x, na.array* y) except NULL
    cpdef free(self)
    cpdef long long nparams(self)
    cpdef long long nbytes(self)


cdef class Embedding:
    cdef na.array* weight
    cdef na.array* scales
    cdef na.array* qbiases
    cdef readonly int num_embeddings, dims, bits, group_size
    cdef readonly bint quantized
    cdef na.array* lookup(self, const na.array& ids) except NULL
    cdef na.array* as_linear(self, const na.array& x) except NULL
    cpdef free(self)
    cpdef long long nparams(self)
    cpdef long long nbytes(self)
    cpdef int dtype_code(self) except -1


cdef class RMSNorm:
    cdef na.array* weight       # already (1 + w) for Gemma's variant
    cdef readonly float eps
    cdef readonly int dims
    cdef na.array* forward(self, const na.array& x) except NULL
    cpdef free(self)
    cpdef long long nparams(self)
    cpdef long long nbytes(self)


cdef na.array* copy_handle(object a, str name) except NULL
