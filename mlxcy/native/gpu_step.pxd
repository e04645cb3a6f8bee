# A whole one-token decode step as one CUDA kernel (include/mlxcy/gpu_step.h).
from libcpp cimport bool
from libcpp.string cimport string
from libcpp.vector cimport vector
from mlxcy.native.array cimport array, Dtype


cdef extern from "mlxcy/gpu_step.h" namespace "mlxcy" nogil:
    int kStepPerLayer
    int kStepGlobal

    cdef cppclass StepPtr:
        StepPtr()
        const array* a
        int row0
        long long value

    cdef cppclass StepConfig:
        StepConfig()
        Dtype dtype
        int bits, group_size, ebits, egs, D, NQ, NKV, HD, FF, V, L
        bool qkv_bias, qk_norm, gemma
        float eps, qk_eps, scale, embed_scale

    cdef cppclass StepState:
        StepState()
        array timing

    int& step_split_mode()
    int step_slice(const StepConfig& c, int blocks) except +
    string step_config_problem(const StepConfig& c) except +
    int step_max_positions(const StepConfig& c) except +
    int step_max_rows(const StepConfig& c) except +
    int step_max_batch(const StepConfig& c) except +
    int& step_launch_rows()
    void step_init(StepState& st, const array& inv_freq) except +
    void step_finish(StepState& st) except +
    array step_decode(const StepConfig& c, const vector[StepPtr]& entries, StepState& st,
                      const array& tok, vector[array]& kbuf, vector[array]& vbuf,
                      int pos, const array* rpos) except +


cdef extern from "mlxcy/fused.h" namespace "mlxcy" nogil:
    bool cuda_default_device() except +
