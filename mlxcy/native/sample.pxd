# Native declarations used by mlxcy/generation/sample.pyx: the mlx/ops.h and random
# functions the samplers need (declared in native/ops.pxd and native/random.pxd,
# cimported here so that `nsm.where(...)` works) and the shims of
# include/mlxcy/sample.h.
from mlxcy.native.array cimport array
from mlxcy.native.ops cimport (
    zeros, astype, reshape, broadcast_to, slice, add, subtract, multiply, divide, minimum,
    less, greater, greater_equal, logical_and, where, exp, max, sum, argmax, logsumexp, sort,
    partition, argpartition, negative, take_along_axis, scatter_add_axis, cumsum,
)
from mlxcy.native.random cimport key


cdef extern from "mlxcy/sample.h" namespace "mlxcy::smp" nogil:
    array categorical_step(const array& logits, double inv_temp, array* key) except +
    array key_from_global() except +
