# Declarations of include/mlxcy/rows.h: the generation engine's helpers for
# arrays with one row per sequence.
from libcpp cimport bool
from mlxcy.native.array cimport array, Dtype


cdef extern from "mlxcy/rows.h" namespace "mlxcy" nogil:
    array cat_axis(const array& a, const array& b, int axis) except +
    array left_pad_t(const array& x, int n) except +
    array fill_rows(const array* x, int rows, int w, bool two_d, Dtype dt, double fill) except +
    array widen_history(const array* h, int rows, int width) except +
