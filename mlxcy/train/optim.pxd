# cython: language_level=3
# Optimizers over native arrays (see optim.pyx). Parameters and gradients are
# std::vector<mlx::core::array>; the state (moments) is float32 whatever the
# parameters' dtype.
from libcpp.vector cimport vector
from mlxcy.native cimport array as na


cdef class Optimizer:
    cdef vector[na.array]* m         # first moment / momentum buffer (heap: class
    cdef vector[na.array]* v         # second moment   attributes of C++ type are optional)
    cdef bint has_state
    cdef readonly long long step     # updates applied so far
    cdef public object learning_rate # float or callable(step) -> float
    cdef public double weight_decay
    # Apply one update in place (params[i] replaced); lr from the schedule.
    cdef int apply(self, vector[na.array]& params, const vector[na.array]& grads) except -1
    cdef int _init_state(self, const vector[na.array]& params) except -1
    cdef int _update(self, vector[na.array]& params, const vector[na.array]& grads,
                     double lr) except -1
    cdef int state_arrays(self, vector[na.array]& out) except -1


# grads scaled so that their global L2 norm is at most max_norm (torch's
# clip_grad_norm_ rule); the norm before clipping goes to norm_out.
cdef vector[na.array] clip_global_norm(const vector[na.array]& grads, double max_norm,
                                       vector[na.array]& norm_out) except *
cdef vector[na.array] add_all(const vector[na.array]& a, const vector[na.array]& b) except *
cdef vector[na.array] scale_all(const vector[na.array]& a, double s) except *
