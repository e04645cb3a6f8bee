# Compiled elementwise pieces of the decoder (include/mlxcy/fused.h).
from mlxcy.native.array cimport array


cdef extern from "mlxcy/fused.h" namespace "mlxcy" nogil:
    array swiglu(const array& g, const array& u) except +
    array geglu_tanh(const array& g, const array& u) except +
    array last_axis_slice(const array& x, int start, int stop) except +


# Cross-entropy with a hand-written VJP (include/mlxcy/xent.h).
cdef extern from "mlxcy/xent.h" namespace "mlxcy" nogil:
    array token_xent(const array& logits, const array& targets) except +
