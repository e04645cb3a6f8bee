# cython: language_level=3, cpp_locals=True
"""Layers over native MLX arrays: Linear (optionally biased, optionally
quantized in MLX's affine layout), Embedding (optionally quantized, usable as
a tied output head) and RMSNorm (with Gemma's (1 + w) variant).

Each layer owns its arrays; `free()` releases them at once. The Python-level
`__call__` is a convenience (tests, scripts); models call the cdef methods.
"""
from mlxcy.core cimport Array, wrap, handle, to_array
from mlxcy.native cimport array as na
from mlxcy.native cimport nn as nnn
from mlxcy.native cimport ops as nops
from mlxcy.native cimport fast as nfast
from mlxcy.native cimport random as nrnd
from mlxcy.native.array cimport heap
from mlxcy.cpu_kernels cimport use_kernels, cpu_linear
from libcpp.vector cimport vector


# Quantized layers on the CPU dequantize the weight right before the product
# and use MLX's float GEMM instead of its CPU quantized_matmul (a scalar loop,
# 2.5x slower for one token and ~20x for a 512-token prefill chunk on the
# 2-core development VM; see include/mlxcy/qcpu.h), DEQUANT_BLOCK rows at a
# time (bounds the temporary of a vocabulary head).  The GPU keeps MLX's fused
# quantized kernels, which read the packed weight directly.
cdef enum:
    DEQUANT_BLOCK = 1024

# Evaluate each block's product before building the next (Model.forward sets
# it around the head in CPU inference; see include/mlxcy/qcpu.h).
cdef bint EVAL_BLOCKS = False


cdef bint set_eval_blocks(bint on) noexcept:
    """Returns the previous setting (for Model.forward's try/finally); a cdef
    function, so the CPU decode step switches it with no Python call."""
    global EVAL_BLOCKS
    cdef bint old = EVAL_BLOCKS
    EVAL_BLOCKS = on
    return old


cdef inline bint _dequant_path(const na.array& w, int group_size, int bits) noexcept:
    if na.default_device().type == na.cpu:
        return True
    # MLX 0.32.4's CUDA quantized_matmul returns zeros for inputs of several
    # rows when each weight row is a single group (in_features == group_size;
    # mlx.core alike: benchmarks/gpu_probe.py, mx_qmm_k64_gs64_*).  Only tiny
    # layers are that narrow, so the dequantized product costs nothing there.
    return w.shape(w.ndim() - 1) * 32 // bits == group_size


cdef na.array* _qmatmul(const na.array& x, const na.array& w, const na.array& scales,
                        const na.array* qbiases, int group_size, int bits,
                        const na.array* bias) except NULL:
    """x @ dequantize(w).T (+ bias) by the fastest path for the device."""
    if qbiases != NULL and use_kernels(x, w, &scales, group_size, bits):   # mlxcy.cpu_kernels
        return cpu_linear(x, w, &scales, qbiases, group_size, bits, bias)
    if _dequant_path(w, group_size, bits):
        return heap(nnn.qlinear_dequant(x, w, scales, qbiases, group_size, bits, bias,
                                        DEQUANT_BLOCK, EVAL_BLOCKS))
    return heap(nnn.qlinear(x, w, scales, qbiases, group_size, bits, bias))


cdef na.array* _flinear(const na.array& x, const na.array& w, const na.array* bias) except NULL:
    """x @ w.T (+ bias): mlxcy.cpu_kernels on the CPU, MLX's matmul elsewhere."""
    if use_kernels(x, w, NULL, 0, 0):
        return cpu_linear(x, w, NULL, NULL, 0, 0, bias)
    return heap(nnn.linear(x, w, bias))


cdef na.array* copy_handle(object a, str name) except NULL:
    """A new native handle sharing `a`'s data (a must be an Array)."""
    if type(a) is not Array:
        raise TypeError(f"{name}: expected an mlxcy Array, got {type(a).__name__}")
    return new na.array(handle(<Array>a)[0])


cdef inline void _del(na.array** p) noexcept:
    if p[0] != NULL:
        del p[0]
        p[0] = NULL


cdef inline na.array* _live(na.array* p, object owner) except NULL:
    if p == NULL:
        raise ValueError(f"{type(owner).__name__}: its weights have been freed")
    return p


cdef int _take_weights(na.array** weight, na.array** scales, na.array** qbiases, Array w,
                       Array s, Array b, int bits, str owner) except -1:
    """A layer's own handles on its weight and, when quantized (s given), its
    scales and affine biases; returns the unpacked input width."""
    weight[0] = copy_handle(w, owner + ".weight")
    if s is None:
        return weight[0].shape(1)
    if bits not in (2, 3, 4, 5, 6, 8):
        raise ValueError(f"{owner}: unsupported bits {bits}")
    scales[0] = copy_handle(s, owner + ".scales")
    if b is not None:
        qbiases[0] = copy_handle(b, owner + ".biases")
    return weight[0].shape(1) * 32 // bits


cdef long long _packed_params(na.array* w, int bits):
    # uint32 packs 32 // bits values per element
    if w == NULL:
        return 0
    return <long long>w.size() * (32 // bits)


cdef long long _nb(na.array* p):
    return 0 if p == NULL else <long long>p.nbytes()


cdef class Linear:
    """y = x @ W.T (+ b).  Quantized when `scales` is given (W packed uint32)."""

    def __init__(self, Array weight, Array bias=None, Array scales=None, Array biases=None,
                 int group_size=64, int bits=4):
        self.in_features = _take_weights(&self.weight, &self.scales, &self.qbiases, weight,
                                         scales, biases, bits, "Linear")
        if bias is not None:
            self.bias = copy_handle(bias, "Linear.bias")
        self.quantized = scales is not None
        self.group_size = group_size
        self.bits = bits
        self.out_features = self.weight.shape(0)

    def __dealloc__(self):
        _free_linear(self)

    cpdef free(self):
        _free_linear(self)

    cdef na.array* forward(self, const na.array& x) except NULL:
        cdef na.array* w = _live(self.weight, self)
        cdef na.array* y
        if self.quantized:
            y = _qmatmul(x, w[0], self.scales[0], self.qbiases, self.group_size, self.bits,
                         self.bias)
        else:
            y = _flinear(x, w[0], self.bias)
        if self.lora_a == NULL or self.lora_b == NULL:
            return y
        return self.lora_forward(x, y)

    cdef na.array* forward_rows(self, const na.array& x, int r0, int r1) except NULL:
        """Output features [r0, r1) of forward(x), from those rows of the weight
        alone (views: no copy).  A fused q/k/v or gate/up layer runs its parts
        this way in prefill, where each part's output is large: separate buffers
        are freed part by part instead of the fused output living until its
        last slice is consumed."""
        cdef na.array* w = _live(self.weight, self)
        if self.lora_a != NULL and self.lora_b != NULL:
            raise ValueError("Linear.forward_rows: not with a LoRA adapter")
        cdef na.array wr = nnn.rows(w[0], r0, r1)
        cdef na.array b = wr
        cdef na.array* bp = NULL
        cdef na.array s = wr
        cdef na.array qb = wr
        cdef na.array* qbp = NULL
        if self.bias != NULL:
            b = nnn.rows(self.bias[0], r0, r1)
            bp = &b
        if not self.quantized:
            return _flinear(x, wr, bp)
        s = nnn.rows(self.scales[0], r0, r1)
        if self.qbiases != NULL:
            qb = nnn.rows(self.qbiases[0], r0, r1)
            qbp = &qb
        return _qmatmul(x, wr, s, qbp, self.group_size, self.bits, bp)

    cdef na.array* lora_forward(self, const na.array& x, na.array* y) except NULL:
        """y + (scale * (dropout(x) @ A) @ B).astype(x.dtype), as mlx-lm's
        LoRALinear; takes ownership of y."""
        cdef na.array base = nnn.own(y)
        cdef na.array h = x
        cdef na.Shape shp
        cdef na.array keep
        cdef double p = self.lora_dropout
        if self.training and p > 0:
            shp = x.shape()
            keep = nrnd.bernoulli(na.array(1.0 - p), &shp, NULL)
            h = nnn.multiply(nnn.multiply(h, nnn.astype(keep, x.dtype())),
                             nnn.scalar(1.0 / (1.0 - p), x.dtype()))
        cdef na.array z = nnn.matmul(nnn.matmul(h, self.lora_a[0]), self.lora_b[0])
        z = nnn.astype(nnn.multiply(z, nnn.scalar(self.lora_scale, z.dtype())), x.dtype())
        return heap(nnn.add(base, z))

    # -- LoRA adapter ------------------------------------------------------------
    def set_lora(self, Array a, Array b, float scale=20.0, float dropout=0.0):
        """Attach a LoRA adapter: a [in, r], b [r, out] (mlx-lm's layout)."""
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != self.in_features \
                or b.shape[1] != self.out_features or a.shape[1] != b.shape[0]:
            raise ValueError(f"Linear.set_lora: need lora_a [{self.in_features}, r] and "
                             f"lora_b [r, {self.out_features}], got {tuple(a.shape)} and "
                             f"{tuple(b.shape)}")
        if not (0.0 <= dropout < 1.0):
            raise ValueError(f"Linear.set_lora: dropout must be in [0, 1), got {dropout}")
        cdef na.array* pa = copy_handle(a, "lora_a")
        cdef na.array* pb = copy_handle(b, "lora_b")
        _del(&self.lora_a)
        _del(&self.lora_b)
        self.lora_a, self.lora_b = pa, pb
        self.lora_scale = scale
        self.lora_dropout = dropout

    def clear_lora(self):
        """Remove the adapter (the layer is the plain base layer again)."""
        _del(&self.lora_a)
        _del(&self.lora_b)

    @property
    def has_lora(self):
        return self.lora_a != NULL and self.lora_b != NULL

    @property
    def lora(self):
        """(lora_a, lora_b) as new Arrays sharing the adapter's data, or None."""
        if self.lora_a == NULL or self.lora_b == NULL:
            return None
        return wrap(new na.array(self.lora_a[0])), wrap(new na.array(self.lora_b[0]))

    def base_arrays(self):
        """{'weight', 'bias', 'scales', 'biases'} present on this layer, as Arrays."""
        out = {}
        if self.weight != NULL:
            out["weight"] = wrap(new na.array(self.weight[0]))
        if self.bias != NULL:
            out["bias"] = wrap(new na.array(self.bias[0]))
        if self.scales != NULL:
            out["scales"] = wrap(new na.array(self.scales[0]))
        if self.qbiases != NULL:
            out["biases"] = wrap(new na.array(self.qbiases[0]))
        return out

    def __call__(self, Array x):
        return wrap(self.forward(handle(x)[0]))

    cpdef long long nparams(self):
        cdef long long n = _packed_params(self.weight, self.bits) if self.quantized \
            else (0 if self.weight == NULL else <long long>self.weight.size())
        if self.bias != NULL:
            n += self.bias.size()
        return n

    cpdef long long nbytes(self):
        return _nb(self.weight) + _nb(self.scales) + _nb(self.qbiases) + _nb(self.bias)


cdef void _free_linear(Linear l) noexcept:
    _del(&l.weight)
    _del(&l.scales)
    _del(&l.qbiases)
    _del(&l.bias)
    _del(&l.lora_a)
    _del(&l.lora_b)


cdef class Embedding:
    """Rows of a [vocab, dims] table; quantized when `scales` is given."""

    def __init__(self, Array weight, Array scales=None, Array biases=None,
                 int group_size=64, int bits=4):
        self.dims = _take_weights(&self.weight, &self.scales, &self.qbiases, weight, scales,
                                  biases, bits, "Embedding")
        self.quantized = scales is not None
        self.group_size = group_size
        self.bits = bits
        self.num_embeddings = self.weight.shape(0)

    def __dealloc__(self):
        _free_embedding(self)

    cpdef free(self):
        _free_embedding(self)

    cpdef int dtype_code(self) except -1:
        """The dtype of the looked-up rows (the scales' for quantized tables)."""
        cdef na.array* w = _live(self.weight, self)
        if self.quantized:
            return na.dtype_code(self.scales.dtype())
        return na.dtype_code(w.dtype())

    cdef na.array* lookup(self, const na.array& ids) except NULL:
        cdef na.array* w = _live(self.weight, self)
        if not self.quantized:
            return heap(nnn.take(w[0], ids, 0))
        cdef na.array rows = nnn.take(w[0], ids, 0)
        cdef na.array sc = nnn.take(self.scales[0], ids, 0)
        cdef na.array bi
        if self.qbiases != NULL:
            bi = nnn.take(self.qbiases[0], ids, 0)
            return heap(nops.dequantize_(rows, sc, &bi, self.group_size, self.bits, b"affine", -1))
        return heap(nops.dequantize_(rows, sc, NULL, self.group_size, self.bits, b"affine", -1))

    cdef na.array* as_linear(self, const na.array& x) except NULL:
        cdef na.array* w = _live(self.weight, self)
        if self.quantized:
            return _qmatmul(x, w[0], self.scales[0], self.qbiases, self.group_size, self.bits,
                            NULL)
        return _flinear(x, w[0], NULL)

    def __call__(self, Array ids):
        return wrap(self.lookup(handle(ids)[0]))

    cpdef long long nparams(self):
        if self.quantized:
            return _packed_params(self.weight, self.bits)
        return 0 if self.weight == NULL else <long long>self.weight.size()

    cpdef long long nbytes(self):
        return _nb(self.weight) + _nb(self.scales) + _nb(self.qbiases)


cdef void _free_embedding(Embedding e) noexcept:
    _del(&e.weight)
    _del(&e.scales)
    _del(&e.qbiases)


cdef class RMSNorm:
    """x / rms(x) * w, or * (1 + w) with offset=1 (Gemma).  The (1 + w) is
    computed once, in the weight's dtype."""

    def __init__(self, Array weight, float eps=1e-5, float offset=0.0):
        cdef na.array* w = copy_handle(weight, "RMSNorm.weight")
        if w.ndim() != 1:
            del w
            raise ValueError("RMSNorm.weight must be 1-dimensional")
        if offset != 0.0:
            self.weight = heap(nnn.add(w[0], nnn.scalar(offset, w.dtype())))
            del w
            self.weight.eval()
        else:
            self.weight = w
        self.eps = eps
        self.dims = self.weight.shape(0)

    def __dealloc__(self):
        _del(&self.weight)

    cpdef free(self):
        _del(&self.weight)

    cdef na.array* forward(self, const na.array& x) except NULL:
        return heap(nfast.rms_norm(x, _live(self.weight, self), self.eps))

    def __call__(self, Array x):
        return wrap(self.forward(handle(x)[0]))

    cpdef long long nparams(self):
        return 0 if self.weight == NULL else <long long>self.weight.size()

    cpdef long long nbytes(self):
        return _nb(self.weight)


def quantize(Array w, int group_size=64, int bits=4):
    """(wq, scales, biases): MLX's affine quantization of w along its last axis."""
    cdef vector[na.array] r = nops.quantize_(handle(w)[0], group_size, bits, b"affine")
    return tuple(wrap(heap(r[i])) for i in range(r.size()))


def dequantize(Array w, Array scales, Array biases=None, int group_size=64, int bits=4):
    cdef na.array* b = NULL
    if biases is not None:
        b = handle(biases)
    return wrap(heap(nops.dequantize_(handle(w)[0], handle(scales)[0], b, group_size, bits,
                                      b"affine", -1)))
