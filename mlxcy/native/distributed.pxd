# Declarations mirroring mlx/distributed/distributed.h and mlx/distributed/ops.h
# (MLX's own communication layer: the ring backend over TCP on CPUs, NCCL on
# CUDA, MPI, JACCL). Ops are declared without the trailing StreamOrDevice.
from libcpp cimport bool
from libcpp.string cimport string
from libcpp.optional cimport optional
from mlxcy.native.array cimport array, Dtype, Shape


cdef extern from "mlx/distributed/distributed.h" namespace "mlx::core::distributed" nogil:
    cdef cppclass Group:
        Group(const Group&)
        int rank() except +
        int size() except +
        Group split(int color, int key) except +

    bool is_available() except +
    bool is_available(const string& backend) except +
    # strict: raise when no backend can be initialized (else a size-1 group)
    Group init(bool strict, const string& backend) except +


cdef extern from "mlx/distributed/ops.h" namespace "mlx::core::distributed" nogil:
    array all_sum(const array&, optional[Group]) except +
    array all_max(const array&, optional[Group]) except +
    array all_min(const array&, optional[Group]) except +
    # concatenation of every rank's array along axis 0, in rank order
    array all_gather(const array&, optional[Group]) except +
    array sum_scatter(const array&, optional[Group]) except +
    array send(const array&, int dst, optional[Group]) except +
    array recv(Shape, Dtype, int src, optional[Group]) except +
    array recv_like(const array&, int src, optional[Group]) except +
