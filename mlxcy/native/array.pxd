# Declarations mirroring mlx/array.h, mlx/dtype.h, mlx/device.h, mlx/stream.h
# and mlx/utils.h, plus mlxcy's own C++ helpers (include/mlxcy/core.h).
from libc.stdint cimport int32_t, int64_t, uint8_t, uintptr_t
from libcpp cimport bool
from libcpp.vector cimport vector


cdef extern from "mlx/mlx.h" namespace "mlx::core" nogil:
    cdef cppclass Dtype:
        Dtype(const Dtype&)
        uint8_t size()

    Dtype bool_
    Dtype uint8
    Dtype uint16
    Dtype uint32
    Dtype uint64
    Dtype int8
    Dtype int16
    Dtype int32
    Dtype int64
    Dtype float16
    Dtype float32
    Dtype float64
    Dtype bfloat16
    Dtype complex64

    bool issubdtype(const Dtype&, const Dtype&)
    Dtype promote_types(const Dtype&, const Dtype&)

    # SmallVector<int32_t> and SmallVector<int64_t>: only what we use.
    cdef cppclass Shape:
        Shape()
        size_t size()
        int32_t& operator[](size_t)
        void push_back(int32_t)

    cdef cppclass Strides:
        Strides()
        size_t size()
        int64_t& operator[](size_t)

    cdef enum DeviceType "mlx::core::Device::DeviceType":
        cpu "mlx::core::Device::DeviceType::cpu"
        gpu "mlx::core::Device::DeviceType::gpu"

    cdef cppclass Device:
        Device(DeviceType, int)
        DeviceType type
        int index

    cdef cppclass Stream:
        Stream(int, Device)
        int index
        Device device
        bool operator==(const Stream&)

    cdef cppclass array:
        array(const array&)
        array(bool) except +
        array(int) except +
        array(int64_t) except +
        array(double) except +
        array(bool, Dtype) except +
        array(int64_t, Dtype) except +
        array(double, Dtype) except +
        size_t itemsize()
        size_t size()
        size_t nbytes()
        size_t ndim()
        const Shape& shape()
        int32_t shape(int)
        const Strides& strides()
        Dtype dtype()
        void eval() except + nogil
        uintptr_t id()
        bool is_available()
        size_t data_size()
        T item[T]() except + nogil

    # Devices and streams
    const Device& default_device()
    void set_default_device(const Device&) except +
    bool is_available(const Device&)
    int device_count(DeviceType)
    Stream default_stream(Device) except +
    void set_default_stream(Stream) except +
    Stream new_stream(Device) except +
    void synchronize() except + nogil
    void synchronize(Stream) except + nogil


cdef extern from "mlxcy/core.h" namespace "mlxcy" nogil:
    array* heap(array) except +
    array* new_bool(bool) except +
    int dtype_code(Dtype)
    Dtype dtype_from_code(int) except +
    Shape make_shape(const int32_t*, int)
    Shape shape1(int)
    Shape shape2(int, int)
    Shape shape3(int, int, int)
    Shape shape4(int, int, int, int)
    array* array_from_host(const void*, const int32_t*, int, Dtype) except +
    const void* host_data(const array&)
    bool row_contiguous(const array&)
