# Declarations mirroring mlx/io.h through the shims of include/mlxcy/io.h, which
# flatten MLX's maps (of arrays, of variant metadata) into parallel vectors.
from libcpp.string cimport string
from libcpp.vector cimport vector

from mlxcy.native.array cimport array, Device


cdef extern from "mlxcy/io.h" namespace "mlxcy" nogil:
    cdef cppclass NamedArrays:
        vector[string] names
        vector[array] arrays

    cdef cppclass MetaItem:
        string key
        int kind          # 0 none, 1 array, 2 string, 3 list of strings, 4 number
        size_t index      # kind 1: index into LoadResult.meta_arrays
        string str
        vector[string] strs
        size_t number

    cdef cppclass LoadResult:
        NamedArrays tensors
        vector[MetaItem] meta
        vector[array] meta_arrays

    LoadResult* load_safetensors(const string&) except +
    LoadResult* load_gguf(const string&) except +
    void save_safetensors(const string&, const vector[string]&, const vector[array]&,
                          const vector[string]&, const vector[string]&) except +
    array* load_npy(const string&) except +
    vector[MetaItem] device_info(const Device&) except +


cdef extern from "mlx/io.h" namespace "mlx::core" nogil:
    void save_npy "mlx::core::save"(string, array) except +
