# cython: language_level=3, cpp_locals=True
"""mlxcy's CPU kernels for linear layers (include/mlxcy/cpu_quant.h).

One MLX primitive computes y = x @ W.T (+ bias) for W in MLX's affine
quantized layout (4 or 8 bits, group size 32/64/128, scales and biases in
float32/bfloat16/float16) or in float32/bfloat16/float16: AVX2+FMA code chosen
at run time from CPUID (a portable scalar path elsewhere), output rows split
over a persistent thread pool.  The layers of mlxcy.nn use it when the default
device is the CPU; its vjp (x's gradient through the dequantized weight) keeps
LoRA training over quantized layers working.

    linear(x, w, scales=None, biases=None, group_size=64, bits=4, bias=None)
    set_num_threads(n) / num_threads()   (default: MLXCY_NUM_THREADS,
                                          OMP_NUM_THREADS, else the cores)
    set_enabled(None | True | False)     (None: on when the device is the CPU)
    set_isa("avx512vnni" | "avx2" | "scalar") / isa()
"""
from mlxcy.core cimport Array, wrap, handle
from mlxcy.native cimport array as na
from mlxcy.native.array cimport heap
from libc.stdint cimport int64_t
from libcpp.vector cimport vector

cdef extern from "mlxcy/cpu_block.h" namespace "mlxcy::cpu" nogil:
    bint block_qkv_supported(const na.array& x, const na.array& norm_w,
                             const vector[LinearArg]& parts, int H, int Hkv, int D,
                             int rope_dims, const na.array* freqs, const na.array* q_norm,
                             const na.array* k_norm, const na.array* offsets)
    vector[na.array] cpu_block_qkv "mlxcy::cpu::block_qkv"(
        const na.array& x, const na.array& norm_w, float eps, const vector[LinearArg]& parts,
        int H, int Hkv, int D, int rope_dims, float rope_base, float rope_scale,
        const na.array* freqs, const na.array* q_norm, const na.array* k_norm, float qk_eps,
        int offset, const na.array* offsets) except +
    bint block_mlp_supported(const na.array& x, int HD, const LinearArg& o,
                             const na.array* norm_o, const na.array& norm_mid,
                             const vector[LinearArg]& gate_up, const LinearArg& down,
                             const na.array* norm_mlp)
    bint block_attn_mlp_supported(const na.array& q, const na.array& k, const na.array& v,
                                  const na.array& x, const LinearArg& o, const na.array* norm_o,
                                  const na.array& norm_mid, const vector[LinearArg]& gate_up,
                                  const LinearArg& down, const na.array* norm_mlp,
                                  const na.array* mask)
    na.array cpu_block_attn_mlp "mlxcy::cpu::block_attn_mlp"(
        const na.array& q, const na.array& k, const na.array& v, const na.array& x,
        float attn_scale, const LinearArg& o, const na.array* norm_o, float eps_o,
        const na.array& norm_mid, float eps_mid, const vector[LinearArg]& gate_up,
        const LinearArg& down, const na.array* norm_mlp, float eps_mlp, int act,
        const na.array* mask) except +

cdef extern from "mlxcy/cpu_quant.h" namespace "mlxcy::cpu" nogil:
    bint linear_supported(const na.array& x, const na.array& w, const na.array* scales,
                          int group_size, int bits)
    na.array cpp_linear "mlxcy::cpu::linear"(const na.array& x, const na.array& w,
                                             const na.array* scales, const na.array* biases,
                                             int group_size, int bits,
                                             const na.array* bias) except +
    bint cpu_has_avx2()
    bint cpu_has_vnni()
    const char* isa_name()
    void set_simd_level(int)
    void cpp_set_activation_mode "mlxcy::cpu::set_activation_mode"(int)
    int& cpp_activation_mode "mlxcy::cpu::activation_mode"()
    void cpp_set_gemm_min_rows "mlxcy::cpu::set_gemm_min_rows"(int)
    void cpp_set_gemm_run_bytes "mlxcy::cpu::set_gemm_run_bytes"(int64_t)
    int64_t cpp_gemm_run_bytes "mlxcy::cpu::gemm_run_bytes"()
    void cpp_set_rows_tile_bytes "mlxcy::cpu::set_rows_tile_bytes"(int64_t)
    int64_t cpp_rows_tile_bytes "mlxcy::cpu::rows_tile_bytes"()
    int cpp_int16_max_rows "mlxcy::cpu::int16_max_rows"()

cdef extern from "mlxcy/cpu_attention.h" namespace "mlxcy::cpu" nogil:
    bint attention_supported(const na.array& q, const na.array& k, const na.array& v)
    bint mask_supported(const na.array& m, int B, int H, int L, int T)
    na.array cpp_attention "mlxcy::cpu::attention"(
        const na.array& q, const na.array& k, const na.array& v, float scale,
        bint causal, const na.array* mask) except +

cdef extern from "mlxcy/cpu_act.h" namespace "mlxcy::cpu" nogil:
    bint act_supported(const na.array& g, const na.array& u)
    na.array cpp_activation "mlxcy::cpu::activation"(const na.array& g, const na.array& u,
                                                     int act) except +

cdef extern from "mlxcy/cpu_pool.h" namespace "mlxcy::cpu" nogil:
    cdef cppclass Pool:
        @staticmethod
        Pool& instance()
        int size()
        void resize(int) except +
    int available_cores()


# -1: automatic (on when the default device is the CPU); 0: off; 1: on.
cdef int MODE = -1


cdef bint use_kernels(const na.array& x, const na.array& w, const na.array* scales,
                      int group_size, int bits) noexcept:
    if MODE == 0:
        return False
    if MODE < 0 and na.default_device().type != na.cpu:
        return False
    return linear_supported(x, w, scales, group_size, bits)


cdef na.array* cpu_linear(const na.array& x, const na.array& w, const na.array* scales,
                      const na.array* biases, int group_size, int bits,
                      const na.array* bias) except NULL:
    return heap(cpp_linear(x, w, scales, biases, group_size, bits, bias))


cdef bint use_attention(const na.array& q, const na.array& k, const na.array& v,
                        const na.array* mask) noexcept:
    if MODE == 0:
        return False
    if MODE < 0 and na.default_device().type != na.cpu:
        return False
    if not attention_supported(q, k, v):
        return False
    return mask == NULL or mask_supported(mask[0], q.shape(0), q.shape(1), q.shape(2),
                                          k.shape(2))


cdef na.array* cpu_attention(const na.array& q, const na.array& k, const na.array& v,
                             float scale, bint causal, const na.array* mask) except NULL:
    return heap(cpp_attention(q, k, v, scale, causal, mask))


cdef bint use_activation(const na.array& g, const na.array& u) noexcept:
    if MODE == 0:
        return False
    if MODE < 0 and na.default_device().type != na.cpu:
        return False
    return act_supported(g, u)


cdef na.array* cpu_activation(const na.array& g, const na.array& u, int act) except NULL:
    return heap(cpp_activation(g, u, act))


# Decode steps of plain pre-norm blocks in two primitives (cpu_block.h).
cdef bint BLOCKS = True


cdef bint use_block_kernels() noexcept:
    if MODE == 0 or not BLOCKS:
        return False
    return MODE > 0 or na.default_device().type == na.cpu


cdef bint block_qkv_ok(const na.array& x, const na.array& norm_w,
                       const vector[LinearArg]& parts, int H, int Hkv, int D, int rope_dims,
                       const na.array* freqs, const na.array* q_norm,
                       const na.array* k_norm, const na.array* offsets) noexcept:
    return block_qkv_supported(x, norm_w, parts, H, Hkv, D, rope_dims, freqs, q_norm, k_norm,
                               offsets)


cdef int block_qkv_run(vector[na.array]& out, const na.array& x, const na.array& norm_w,
                       float eps, const vector[LinearArg]& parts, int H, int Hkv, int D,
                       int rope_dims, float rope_base, float rope_scale, const na.array* freqs,
                       const na.array* q_norm, const na.array* k_norm, float qk_eps,
                       int offset, const na.array* offsets) except -1:
    out = cpu_block_qkv(x, norm_w, eps, parts, H, Hkv, D, rope_dims, rope_base, rope_scale,
                        freqs, q_norm, k_norm, qk_eps, offset, offsets)
    return 0


cdef bint block_mlp_ok(const na.array& x, int HD, const LinearArg& o, const na.array* norm_o,
                       const na.array& norm_mid, const vector[LinearArg]& gate_up,
                       const LinearArg& down, const na.array* norm_mlp) noexcept:
    return block_mlp_supported(x, HD, o, norm_o, norm_mid, gate_up, down, norm_mlp)


cdef na.array* block_attn_mlp_run(const na.array& q, const na.array& k, const na.array& v,
                                  const na.array& x, float attn_scale, const LinearArg& o,
                                  const na.array* norm_o, float eps_o, const na.array& norm_mid,
                                  float eps_mid, const vector[LinearArg]& gate_up,
                                  const LinearArg& down, const na.array* norm_mlp,
                                  float eps_mlp, int act, const na.array* mask) except NULL:
    return heap(cpu_block_attn_mlp(q, k, v, x, attn_scale, o, norm_o, eps_o, norm_mid, eps_mid,
                                   gate_up, down, norm_mlp, eps_mlp, act, mask))


cdef LinearArg _linear_arg(Array w, Array scales, Array biases, Array bias, int gs,
                           int bits) except *:
    cdef LinearArg a = LinearArg()
    a.w = handle(w)
    if scales is not None:
        if biases is None:
            raise ValueError("affine quantization needs `biases`")
        a.scales = handle(scales)
        a.biases = handle(biases)
        a.gs = gs
        a.bits = bits
    if bias is not None:
        a.bias = handle(bias)
    return a


cdef vector[LinearArg] _parts(list layers) except *:
    cdef vector[LinearArg] v = vector[LinearArg]()
    for l in layers:
        v.push_back(_linear_arg(l[0], l[1], l[2], l[3], l[4], l[5]))
    return v


cdef const na.array* _opt(Array a):
    if a is None:
        return NULL
    return handle(a)


def block_qkv(Array x, Array norm_w, float eps, parts, int H, int Hkv, int D, int rope_dims,
              float rope_base=10000.0, float rope_scale=1.0, Array freqs=None,
              Array q_norm=None, Array k_norm=None, float qk_eps=1e-6, int offset=0,
              Array offsets=None):
    """One decode step's RMSNorm -> q/k/v products -> (per-head q/k RMSNorm) ->
    RoPE of a pre-norm block, as one primitive: x [B, 1, hidden]; parts: a list
    of one fused q/k/v layer or of the q, k and v layers, each (weight, scales,
    biases, bias, group_size, bits) with None for what is absent; returns
    (q [B, H, 1, D], k [B, Hkv, 1, D], v [B, Hkv, 1, D]), q and k rotated at
    position `offset`, or row b at offsets[b] (int32 [B]: a batch's rows at
    their own positions), as MLX's non-traditional RoPE."""
    cdef vector[LinearArg] ps = _parts(list(parts))
    cdef const na.array* fp = _opt(freqs)
    cdef const na.array* qn = _opt(q_norm)
    cdef const na.array* kn = _opt(k_norm)
    cdef const na.array* op = _opt(offsets)
    if not block_qkv_supported(handle(x)[0], handle(norm_w)[0], ps, H, Hkv, D, rope_dims, fp,
                               qn, kn, op):
        raise ValueError(f"block_qkv: unsupported shapes or dtypes: x {tuple(x.shape)} "
                         f"{x.dtype}, norm {tuple(norm_w.shape)}, {len(parts)} part(s), "
                         f"H {H}, Hkv {Hkv}, D {D}, rope_dims {rope_dims}"
                         + ("" if offsets is None else
                            f", offsets {tuple(offsets.shape)} {offsets.dtype}"))
    cdef vector[na.array] r = cpu_block_qkv(handle(x)[0], handle(norm_w)[0], eps, ps, H, Hkv, D,
                                            rope_dims, rope_base, rope_scale, fp, qn, kn, qk_eps,
                                            offset, op)
    return wrap(heap(r[0])), wrap(heap(r[1])), wrap(heap(r[2]))


def block_attn_mlp(Array q, Array k, Array v, Array x, float attn_scale, o, Array norm_mid,
                   float eps, gate_up, down, str act="silu", Array norm_o=None,
                   Array norm_mlp=None, Array mask=None):
    """The rest of a pre-norm block's decode step as one primitive: attention of
    q [B, H, 1, D] over k, v [B, Hkv, T, D] -> o_proj (-> norm_o) -> h = x + that
    -> RMSNorm(norm_mid) -> gate/up -> act(gate) * up -> down (-> norm_mlp) ->
    h + that: [B, 1, hidden].  o, down: (weight, scales, biases, bias,
    group_size, bits); gate_up: a list of one fused layer or of gate and up.
    norm_o / norm_mlp: Gemma's sandwich norms (same eps).  mask: the
    attention's (a batch's padding), boolean or additive, broadcast to
    [B, H, L, T]."""
    if act not in ("silu", "gelu_tanh"):
        raise ValueError(f"block_attn_mlp: act must be 'silu' or 'gelu_tanh', got {act!r}")
    cdef LinearArg ao = _linear_arg(o[0], o[1], o[2], o[3], o[4], o[5])
    cdef vector[LinearArg] gu = _parts(list(gate_up))
    cdef LinearArg ad = _linear_arg(down[0], down[1], down[2], down[3], down[4], down[5])
    cdef const na.array* no = _opt(norm_o)
    cdef const na.array* nm = _opt(norm_mlp)
    cdef const na.array* mp = _opt(mask)
    if not block_attn_mlp_supported(handle(q)[0], handle(k)[0], handle(v)[0], handle(x)[0], ao,
                                    no, handle(norm_mid)[0], gu, ad, nm, mp):
        raise ValueError(f"block_attn_mlp: unsupported shapes or dtypes: q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)}, v {tuple(v.shape)}, x {tuple(x.shape)}"
                         + ("" if mask is None else f", mask {tuple(mask.shape)} {mask.dtype}"))
    return wrap(heap(cpu_block_attn_mlp(handle(q)[0], handle(k)[0], handle(v)[0], handle(x)[0],
                                        attn_scale, ao, no, eps, handle(norm_mid)[0], eps, gu,
                                        ad, nm, eps, 0 if act == "silu" else 1, mp)))


def attention(Array q, Array k, Array v, float scale, bint causal=False, Array mask=None):
    """softmax(scale * q k^T (+ mask)) v: q [B, H, L, D], k and v [B, Hkv, T, D]
    (H a multiple of Hkv, L <= T).  causal: the queries are the last L
    positions, so query i sees keys 0 .. T - L + i.  mask: broadcast to
    [B, H, L, T], boolean (False hides a key) or added to the scaled scores."""
    if not attention_supported(handle(q)[0], handle(k)[0], handle(v)[0]):
        raise ValueError(f"attention: need q [B, H, L, D] and k, v [B, Hkv, T, D] with "
                         f"L <= T, got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    cdef const na.array* mp = NULL
    if mask is not None:
        mp = handle(mask)
        if not mask_supported(mp[0], q.shape[0], q.shape[1], q.shape[2], k.shape[2]):
            raise ValueError(f"attention: mask {tuple(mask.shape)} ({mask.dtype}) must be "
                             f"boolean or float and broadcast to [B, H, L, T] = "
                             f"{(q.shape[0], q.shape[1], q.shape[2], k.shape[2])}")
    return wrap(heap(cpp_attention(handle(q)[0], handle(k)[0], handle(v)[0], scale, causal,
                                   mp)))


def activation(Array g, Array u, str act="silu"):
    """act(g) * u, the MLP's activation-times-up product: act "silu" (SwiGLU)
    or "gelu_tanh" (Gemma's GeGLU); g and u of one shape and float dtype."""
    if act not in ("silu", "gelu_tanh"):
        raise ValueError(f"activation: act must be 'silu' or 'gelu_tanh', got {act!r}")
    if not act_supported(handle(g)[0], handle(u)[0]):
        raise ValueError(f"activation: need g and u of one shape and float dtype, got "
                         f"{tuple(g.shape)} {g.dtype} and {tuple(u.shape)} {u.dtype}")
    return wrap(heap(cpp_activation(handle(g)[0], handle(u)[0], 0 if act == "silu" else 1)))


def set_enabled(mode):
    """None: the layers of mlxcy.nn use these kernels when the default device
    is the CPU (the default); True: always when supported; False: never (MLX's
    ops).  Returns the previous setting."""
    global MODE
    old = None if MODE < 0 else bool(MODE)
    MODE = -1 if mode is None else (1 if mode else 0)
    return old


def set_block_fusion(bint on):
    """With the kernels enabled, run a one-token step of a plain pre-norm block
    (Llama, Qwen2, Mistral) as two primitives (RMSNorm + q/k/v + RoPE; attention
    + o_proj + residual + RMSNorm + gate/up + activation + down + residual)
    instead of ~25 MLX ops (on by default; off for A/B runs).  Returns the
    previous setting."""
    global BLOCKS
    old = BLOCKS
    BLOCKS = on
    return old


def enabled():
    return None if MODE < 0 else bool(MODE)


def set_num_threads(int n):
    """Threads of the kernels' pool (the calling thread counts as one)."""
    if n < 1:
        raise ValueError(f"set_num_threads: n must be >= 1, got {n}")
    Pool.instance().resize(n)


def num_threads():
    return Pool.instance().size()


def cores():
    """The cores this process may run on."""
    return available_cores()


ISAS = ("scalar", "avx2", "avx512vnni")


def set_isa(str name):
    """The most the kernels may use: 'avx512vnni' (the default: AVX2+FMA, and
    AVX-512 VNNI for the int16 products), 'avx2' or
    'scalar' (the portable code: for tests and A/B runs).  The CPU's own
    limits apply on top (isa() says what runs)."""
    if name not in ISAS:
        raise ValueError(f"set_isa: expected one of {', '.join(ISAS)}, got {name!r}")
    set_simd_level(ISAS.index(name))


def isa():
    """The instruction set the kernels run with now: 'avx512vnni', 'avx2+fma'
    or 'scalar'."""
    return isa_name().decode()


ACTIVATIONS = ("float32", "int16", "int8")


def set_activations(str mode):
    """How one row of x (a decode step) meets 4-, 5- and 8-bit weights on AVX2:
    'int16' (the default: x as int16 per block of 32, integer dot products;
    ~3e-5 of a product's largest value, ~4e-4 relative on SmolLM2's decode
    logits), 'float32' (exact, slower) or 'int8' (4-bit only, llama.cpp's
    approach, ~6e-3 per product).  Returns the previous mode."""
    if mode not in ACTIVATIONS:
        raise ValueError(f"set_activations: mode must be one of {', '.join(ACTIVATIONS)}, "
                         f"got {mode!r}")
    old = activations()
    cpp_set_activation_mode(ACTIVATIONS.index(mode))
    return old


def activations():
    """The mode set_activations set: 'int16', 'float32' or 'int8'."""
    return ACTIVATIONS[cpp_activation_mode()]


def _activations_from_env():
    """MLXCY_CPU_ACTIVATIONS=float32|int16|int8 sets the mode at import."""
    import os
    mode = os.environ.get("MLXCY_CPU_ACTIVATIONS")
    if mode:
        try:
            set_activations(mode)
        except ValueError as e:
            raise ValueError(f"MLXCY_CPU_ACTIVATIONS: {e}") from None


_activations_from_env()


def has_avx2():
    return cpu_has_avx2()


def has_vnni():
    """AVX-512 VNNI with 256-bit forms (and the OS saves its registers)."""
    return cpu_has_vnni()


def int16_max_rows():
    """Products of at most this many rows of x with 4-, 5- or 8-bit weights
    take the int16 kernels in one pass (int16 mode, AVX2: 11; AVX-512 VNNI:
    16); larger ones the float GEMM, unless they are a step (see
    step_positions)."""
    return cpp_int16_max_rows()


def step_positions():
    """Products whose x [..., L, K] has at most this many positions L per
    sequence (decode steps, speculative verifications, a batch's steps; 16)
    take the int16 kernels at any number of rows, in passes of at most
    int16_max_rows(), so each row's result equals its one-row product."""
    return kStepPositions


def set_gemm_min_rows(int m):
    """Rows of x from which a product runs as a GEMM rather than row by row."""
    if m < 1:
        raise ValueError(f"set_gemm_min_rows: m must be >= 1, got {m}")
    cpp_set_gemm_min_rows(m)


def set_gemm_run_bytes(int64_t n):
    """Bytes of packed x that a GEMM's weight panels meet before moving on
    (default 512 KB: within a core's L2); returns the previous value.  The
    results are the same for any value."""
    if n < 1:
        raise ValueError(f"set_gemm_run_bytes: n must be >= 1, got {n}")
    old = cpp_gemm_run_bytes()
    cpp_set_gemm_run_bytes(n)
    return old


def set_rows_tile_bytes(int64_t n):
    """Bytes of weight rows that the int16 kernels' passes over several rows
    of x meet in turn before moving on (default 64 KB: within a core's L2);
    returns the previous value.  The results are the same for any value."""
    if n < 1:
        raise ValueError(f"set_rows_tile_bytes: n must be >= 1, got {n}")
    old = cpp_rows_tile_bytes()
    cpp_set_rows_tile_bytes(n)
    return old


def linear(Array x, Array w, Array scales=None, Array biases=None, int group_size=64,
           int bits=4, Array bias=None):
    """x @ W.T (+ bias) by mlxcy's CPU kernels (lazy, like any MLX op).  W is
    quantized (w packed uint32, scales, biases: MLX's affine layout) when
    `scales` is given, else float."""
    cdef const na.array* sp = NULL
    cdef const na.array* bp = NULL
    cdef const na.array* biasp = NULL
    if scales is not None:
        sp = handle(scales)
        if biases is None:
            raise ValueError("linear: affine quantization needs `biases`")
        bp = handle(biases)
    if bias is not None:
        biasp = handle(bias)
    if not linear_supported(handle(x)[0], handle(w)[0], sp, group_size, bits):
        raise ValueError(f"linear: unsupported layer for the CPU kernels: x {tuple(x.shape)} "
                         f"{x.dtype}, w {tuple(w.shape)} {w.dtype}, bits {bits}, "
                         f"group_size {group_size}")
    return wrap(heap(cpp_linear(handle(x)[0], handle(w)[0], sp, bp, group_size, bits, biasp)))
