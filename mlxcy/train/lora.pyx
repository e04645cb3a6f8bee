# cython: language_level=3, cpp_locals=True
"""LoRA adapters over mlxcy's native decoder, and the native training step.

    lora = LoRA(model, rank=8, scale=20.0, keys=("q_proj", "v_proj"), num_layers=16)
    step = TrainStep(lora, AdamW(1e-4), grad_checkpoint=False, clip_grad_norm=1.0)
    loss, ntoks, updated = step(ids, offsets, lengths)      # one batch

The adapter of a Linear is mlx-lm's LoRALinear: y = W x + scale * (drop(x) @ A) @ B
with A [in, r] (uniform +-1/sqrt(in)) and B [r, out] (zeros).

fine_tune_type="dora" is mlx-lm's DoRALinear: a magnitude m [out] (float32,
initially the row norms of W) on top of the low-rank update,
    y = g * (W x + scale * (drop(x) @ A) @ B) + bias,
    g = m / stop_gradient(||W + scale * (A @ B).T||_row).
The layer runs it as a plain LoRA layer over installed arrays: weight g[:, None] * W
and lora_b B * g (the same values and gradients); a quantized base is
dequantized once (its Linear holds the float weight while the adapter is on).

fine_tune_type="full" trains every tensor of the top num_layers blocks (mlx-lm's
full fine-tuning): the model's own weights are the parameters, installed into
its layers on each step (float bases only).

The training step is a native closure over Model.forward: MLX's value_and_grad
calls it with the adapter arrays (the tracers) as inputs; it installs them in
the Linear layers, runs the model and the masked cross-entropy, and the
optimizer update then runs over the native arrays. With grad_checkpoint each
block runs under MLX's checkpoint transform (its activations are recomputed in
the backward pass), its adapter arrays passed as inputs so they get gradients.
"""
import math
import numbers
import warnings

import numpy as np

from cpython.ref cimport PyObject
from libcpp.pair cimport pair
from libcpp.vector cimport vector

from mlxcy.core cimport Array, wrap, handle, to_array
from mlxcy.native cimport array as na
from mlxcy.native cimport ops as nops
from mlxcy.native cimport nn as nnn
from mlxcy.native cimport fused as nfused
from mlxcy.native cimport transforms as ntr
from mlxcy.native cimport memory as nmem
from mlxcy.native.transforms cimport ArrayFn, Compiled
from libc.stdint cimport uintptr_t
from mlxcy.native.array cimport heap
from mlxcy.nn cimport Linear, RMSNorm
from mlxcy.models.base cimport Model, Block
from mlxcy.train.optim cimport Optimizer, clip_global_norm, add_all, scale_all

import mlxcy.core as _core
from mlxcy.nn import quantize as _quantize, dequantize as _dequantize

__all__ = ["LoRA", "TrainStep", "KEYS", "DEFAULT_KEYS", "normalize_keys", "cross_entropy",
           "make_batch_arrays", "FINE_TUNE_TYPES"]

FINE_TUNE_TYPES = ("lora", "dora", "full")

# a decoder layer's linear layers, as the model specs name them (mlx-lm's names)
from mlxcy.models.spec import LAYER_LINEARS as KEYS
DEFAULT_KEYS = ("self_attn.q_proj", "self_attn.v_proj")
_SHORT = {k.split(".")[1]: k for k in KEYS}


def normalize_keys(keys):
    """('q_proj', 'mlp.up_proj', ...) -> mlx-lm's layer-relative paths, checked."""
    if keys is None:
        return DEFAULT_KEYS
    if isinstance(keys, str):
        keys = [k for k in keys.replace(",", " ").split() if k]
    out = []
    for k in keys:
        full = _SHORT.get(k, k)
        if full not in KEYS:
            raise ValueError(f"LoRA: unknown target module {k!r}; choose from "
                             f"{', '.join(_SHORT)} (or {', '.join(KEYS)})")
        if full not in out:
            out.append(full)
    if not out:
        raise ValueError("LoRA: no target modules given")
    return tuple(out)


cdef Linear _module(Block b, str key):
    if key == "self_attn.q_proj":
        return b.attn.q_proj
    if key == "self_attn.k_proj":
        return b.attn.k_proj
    if key == "self_attn.v_proj":
        return b.attn.v_proj
    if key == "self_attn.o_proj":
        return b.attn.o_proj
    if key == "mlp.gate_proj":
        return b.mlp.gate_proj
    if key == "mlp.up_proj":
        return b.mlp.up_proj
    if key == "mlp.down_proj":
        return b.mlp.down_proj
    raise ValueError(f"LoRA: unknown target module {key!r}")


cdef inline void _del(na.array** p) noexcept:
    if p[0] != NULL:
        del p[0]
        p[0] = NULL


cdef list _list(const vector[na.array]& v):
    cdef size_t i
    return [wrap(new na.array(v[i])) for i in range(v.size())]


# ------------------------------------------------------------------ loss -----

cdef vector[na.array] masked_ce(const na.array& logits, const na.array& targets,
                                const na.array& mask) except *:
    """[sum(ce * mask) / sum(mask), sum(mask)] in float32 (logits [B, L, V],
    targets int [B, L], mask float [B, L]).  The per-token loss is
    nfused.token_xent: a float32 log-sum-exp without a float32 copy of the
    logits, and a one-kernel backward pass (include/mlxcy/xent.h)."""
    cdef vector[int] every = vector[int]()
    cdef size_t d
    for d in range(mask.ndim()):
        every.push_back(d)
    cdef int V = logits.shape(logits.ndim() - 1)
    cdef na.array ce = nfused.token_xent(nops.reshape(logits, na.shape2(-1, V)),
                                         nops.reshape(targets, na.shape1(-1)))
    cdef na.array m = nnn.astype(mask, na.float32)
    cdef na.array ntoks = nops.sum(m, every, False)
    cdef na.array total = nops.sum(nnn.multiply(nops.reshape(ce, mask.shape()), m), every, False)
    cdef vector[na.array] out = vector[na.array]()
    out.push_back(nnn.divide(total, nops.maximum(ntoks, nnn.scalar(1.0, na.float32))))
    out.push_back(ntoks)
    return out


def cross_entropy(Array logits, Array targets, Array mask):
    """(mean masked next-token cross-entropy, number of counted tokens)."""
    cdef vector[na.array] r = masked_ce(handle(logits)[0], handle(targets)[0], handle(mask)[0])
    return wrap(new na.array(r[0])), wrap(new na.array(r[1]))


def make_batch_arrays(ids, offsets=None, lengths=None):
    """(inputs, targets, mask) numpy arrays from padded ids [B, T]: target j
    (token j+1) counts when offset <= j+1 < length. offsets default to 0
    (nothing masked), lengths to T."""
    ids = np.asarray(ids, dtype=np.int32)
    if ids.ndim == 1:
        ids = ids[None]
    if ids.ndim != 2 or ids.shape[1] < 2:
        raise ValueError(f"batch ids must have shape [B, T] with T >= 2, got {ids.shape}")
    B, T = ids.shape
    off = np.zeros(B, np.int64) if offsets is None else np.asarray(offsets, np.int64).reshape(B)
    ln = np.full(B, T, np.int64) if lengths is None else np.asarray(lengths, np.int64).reshape(B)
    pos = np.arange(1, T)[None, :]
    mask = ((pos >= off[:, None]) & (pos < ln[:, None])).astype(np.float32)
    return ids[:, :-1], ids[:, 1:], mask


# ------------------------------------------------------------------ LoRA -----

cdef class LoRA:
    """LoRA adapters on some Linear layers of a Model (see module docstring).

    rank, scale (mlx-lm's name; alpha / rank in PEFT terms), dropout, keys
    (target modules: q_proj k_proj v_proj o_proj gate_proj up_proj down_proj),
    num_layers (adapt the top N blocks; -1 = all). dtype: the adapters'
    storage dtype (float32: the master copy the optimizer updates);
    compute_dtype: the dtype they are cast to in the forward pass (None: the
    model's dtype, e.g. bfloat16 for mixed precision).
    """

    def __cinit__(self, *args, **kwargs):
        self.params = new vector[na.array]()
        self.compute_code = -1

    def __dealloc__(self):
        if self.params != NULL:
            del self.params
            self.params = NULL

    def __init__(self, Model model, int rank=8, double scale=20.0, double dropout=0.0,
                 keys=None, int num_layers=16, seed=0, dtype="float32", compute_dtype=None,
                 alpha=None, fine_tune_type="lora"):
        if model is None or model.closed:
            raise ValueError("LoRA: the model is closed")
        if fine_tune_type not in FINE_TUNE_TYPES:
            raise ValueError(f"LoRA: fine_tune_type must be one of {', '.join(FINE_TUNE_TYPES)}, "
                             f"got {fine_tune_type!r}")
        self.fine_tune_type = fine_tune_type
        self.per = {"lora": 2, "dora": 3, "full": 1}[fine_tune_type]
        if rank < 1:
            raise ValueError(f"LoRA: rank must be >= 1, got {rank}")
        if not (0.0 <= dropout < 1.0):
            raise ValueError(f"LoRA: dropout must be in [0, 1), got {dropout}")
        if alpha is not None:
            scale = float(alpha) / rank
        if not math.isfinite(scale):
            raise ValueError(f"LoRA: scale must be finite, got {scale}")
        self.model = model
        self.rank, self.scale, self.dropout = rank, scale, dropout
        self.keys = normalize_keys(keys)
        nblocks = len(model.layers)
        if num_layers == 0 or num_layers < -1:
            raise ValueError(f"LoRA: num_layers must be >= 1 or -1 (all), got {num_layers}")
        if num_layers > nblocks:
            raise ValueError(f"LoRA: num_layers {num_layers} exceeds the model's "
                             f"{nblocks} layers")
        self.num_layers = nblocks if num_layers == -1 else num_layers
        st = _core.dtype(dtype)
        if not st.is_floating:
            raise ValueError(f"LoRA: dtype must be floating, got {st}")
        cdt = model.dtype if compute_dtype is None else _core.dtype(compute_dtype)
        self.compute_code = -1 if cdt == st else cdt.code
        self.names, self.layers, self.block_of = [], [], []
        self.originals = {}
        self.bases, self.dweights = [], []
        self.kinds, self.offsets, self.codes = [], [], []
        if fine_tune_type == "full":
            self._init_full(st)
            return
        rng = np.random.default_rng(seed)
        cdef Linear lin
        cdef Block blk
        cdef Array a, b, w
        for i in range(nblocks - self.num_layers, nblocks):
            blk = <Block>model.layers[i]
            for key in self.keys:
                lin = _module(blk, key)
                if lin is None:
                    raise ValueError(f"LoRA: layer {i} has no {key}")
                if lin.has_lora:
                    raise ValueError(f"LoRA: model.layers.{i}.{key} already has an adapter")
                bound = 1.0 / math.sqrt(lin.in_features)
                a = to_array(rng.uniform(-bound, bound, (lin.in_features, rank))
                             .astype(np.float32)).astype(st)
                b = to_array(np.zeros((rank, lin.out_features), np.float32)).astype(st)
                self.params[0].push_back(handle(a)[0])
                self.params[0].push_back(handle(b)[0])
                if fine_tune_type == "dora":
                    base = lin.base_arrays()
                    w = _float_weight(lin, base)
                    self.bases.append(base)
                    self.dweights.append(w)
                    # m: the row norms of the base weight (float32), as mlx-lm's set_linear
                    self.params[0].push_back(nops.sqrt(nops.sum(
                        nops.square(nnn.astype(handle(w)[0], na.float32)), 1, False)))
                    if lin.quantized:      # the layer runs float weights while adapted
                        _set_linear(lin, w, None, None, False)
                self.names.append(f"model.layers.{i}.{key}")
                self.layers.append(lin)
                self.block_of.append(i)
        for lin in self.layers:
            lin.lora_scale = scale
            lin.lora_dropout = dropout
        self._install(self.params[0])

    def _init_full(self, st):
        """Full fine-tuning: every tensor of the top num_layers blocks, as HF names them."""
        cdef Model model = self.model
        cdef Block blk
        cdef Linear lin
        cdef RMSNorm nm
        cdef na.array src
        spec = model.config.spec
        off = float(spec.norm_offset)
        nblocks = len(model.layers)
        for i in range(nblocks - self.num_layers, nblocks):
            blk = <Block>model.layers[i]
            p = f"model.layers.{i}."
            units = []
            for key in KEYS:
                lin = _module(blk, key)
                if lin is None:
                    raise ValueError(f"LoRA: full fine-tuning needs unfused layers "
                                     f"(model.layers.{i} has no {key})")
                if lin.quantized:
                    raise ValueError(f"LoRA: full fine-tuning of a quantized model is not "
                                     f"supported ({p}{key} is quantized): use a float model")
                if lin.has_lora:
                    raise ValueError(f"LoRA: {p}{key} already has an adapter")
                units.append((p + key + ".weight", lin, 0, 0.0))
                if lin.bias != NULL:
                    units.append((p + key + ".bias", lin, 1, 0.0))
            if blk.attn.q_norm is not None:
                units.append((p + "self_attn.q_norm.weight", blk.attn.q_norm, 2, off))
                units.append((p + "self_attn.k_norm.weight", blk.attn.k_norm, 2, off))
            norms = (blk.input_norm, blk.post_attn_norm, blk.pre_ff_norm, blk.post_ff_norm)
            for name, norm in zip(spec.block_norms, norms):
                if norm is not None:
                    units.append((p + name + ".weight", norm, 2, off))
            for name, obj, kind, o in units:
                if kind == 0:
                    src = (<Linear>obj).weight[0]
                elif kind == 1:
                    src = (<Linear>obj).bias[0]
                else:
                    nm = <RMSNorm>obj
                    src = nm.weight[0]
                self.names.append(name)
                self.layers.append(obj)
                self.block_of.append(i)
                self.kinds.append(kind)
                self.offsets.append(o)
                self.codes.append(wrap(new na.array(src)).dtype)
                self.params[0].push_back(nnn.astype(src, na.dtype_from_code(st.code)))
        ev = vector[na.array](self.params[0])
        with nogil:
            ntr.eval(ev)
        self._install(self.params[0])

    # -- installing arrays into the layers -------------------------------------
    cdef int _install_range(self, const vector[na.array]& p, size_t off, size_t first,
                            size_t count) except -1:
        cdef size_t k
        cdef Linear lin
        if self.per == 3:
            for k in range(count):
                self._install_dora(first + k, p[off + 3 * k], p[off + 3 * k + 1],
                                   p[off + 3 * k + 2])
            return 0
        if self.per == 1:
            for k in range(count):
                self._install_full(first + k, p[off + k])
            return 0
        for k in range(count):
            lin = <Linear>self.layers[first + k]
            _del(&lin.lora_a)
            _del(&lin.lora_b)
            if self.compute_code >= 0:
                lin.lora_a = heap(nnn.astype(p[off + 2 * k],
                                             na.dtype_from_code(self.compute_code)))
                lin.lora_b = heap(nnn.astype(p[off + 2 * k + 1],
                                             na.dtype_from_code(self.compute_code)))
            else:
                lin.lora_a = new na.array(p[off + 2 * k])
                lin.lora_b = new na.array(p[off + 2 * k + 1])
        return 0

    cdef int _install_dora(self, size_t j, const na.array& a, const na.array& b,
                           const na.array& m) except -1:
        """weight g[:, None] * W and lora_b B * g[None, :], g = m / ||W + s (A B).T||_row
        (the norm without gradient): the layer's forward is then DoRA's."""
        cdef Linear lin = <Linear>self.layers[j]
        cdef na.array w = handle(<Array>self.dweights[j])[0]
        cdef na.array wf = nnn.astype(w, na.float32)
        cdef na.array bf = nnn.astype(b, na.float32)
        cdef na.array ab = nnn.matmul(nnn.astype(a, na.float32), bf)             # [in, out]
        cdef na.array adapted = nnn.add(wf, nnn.transpose(
            nnn.multiply(ab, nnn.scalar(self.scale, na.float32)), [1, 0]))
        cdef na.array denom = nops.stop_gradient(nops.sqrt(nops.sum(nops.square(adapted), 1,
                                                                    False)))
        cdef na.array g = nnn.divide(nnn.astype(m, na.float32), denom)         # [out]
        cdef int out = lin.out_features
        cdef na.Dtype cd = b.dtype() if self.compute_code < 0 else \
            na.dtype_from_code(self.compute_code)
        _del(&lin.weight)
        lin.weight = heap(nnn.astype(nnn.multiply(nnn.reshape(g, na.shape2(out, 1)), wf),
                                     w.dtype()))
        _del(&lin.lora_a)
        _del(&lin.lora_b)
        lin.lora_a = heap(nnn.astype(a, cd))
        lin.lora_b = heap(nnn.astype(nnn.multiply(bf, nnn.reshape(g, na.shape2(1, out))), cd))
        return 0

    cdef int _install_full(self, size_t j, const na.array& t) except -1:
        cdef int kind = self.kinds[j]
        cdef na.Dtype dt = na.dtype_from_code(self.codes[j].code)
        cdef Linear lin
        cdef RMSNorm nm
        if kind == 2:
            nm = <RMSNorm>self.layers[j]
            _del(&nm.weight)
            nm.weight = heap(nnn.astype(t, dt))
            return 0
        lin = <Linear>self.layers[j]
        if kind == 0:
            _del(&lin.weight)
            lin.weight = heap(nnn.astype(t, dt))
        else:
            _del(&lin.bias)
            lin.bias = heap(nnn.astype(t, dt))
        return 0

    cdef int _install(self, const vector[na.array]& p) except -1:
        if self.merged:
            raise ValueError("LoRA: the adapters are merged into the weights (unmerge() first)")
        return self._install_range(p, 0, 0, len(self.layers))

    def install(self):
        """(Re)attach the current adapter arrays to the layers."""
        self._install(self.params[0])

    def remove(self):
        """Detach the adapters from the layers (the model is its base again)."""
        if self.fine_tune_type == "full":
            raise ValueError("LoRA: full fine-tuning trains the model's own weights; there is "
                             "no adapter to remove (load the model again for its base)")
        for j, lin in enumerate(self.layers):
            (<Linear>lin).clear_lora()
            if self.fine_tune_type == "dora" and not self.merged:
                _restore(<Linear>lin, self.bases[j])

    def train(self, bint mode=True):
        """Dropout on (training) or off (evaluation)."""
        if self.fine_tune_type == "full":
            return
        for lin in self.layers:
            (<Linear>lin).training = mode

    def eval(self):
        self.train(False)

    # -- parameters ----------------------------------------------------------------
    def __len__(self):
        return len(self.names)

    def nparams(self):
        cdef size_t i
        return sum(int(self.params[0][i].size()) for i in range(self.params[0].size()))

    def parameter_names(self):
        if self.per == 1:
            return list(self.names)
        leaves = ("lora_a", "lora_b", "m")[:self.per]
        return [f"{n}.{s}" for n in self.names for s in leaves]

    def parameters(self):
        """{'model.layers.N.<key>.lora_a' | '.lora_b' (| '.m' for DoRA): Array}
        (mlx-lm's names); for full fine-tuning the blocks' tensors by their
        checkpoint names, in the model's dtypes (norms as checkpoints store them)."""
        if self.per != 1:
            return dict(zip(self.parameter_names(), _list(self.params[0])))
        out = {}
        for j, (name, a) in enumerate(zip(self.names, _list(self.params[0]))):
            a = a.astype(self.codes[j])
            if self.offsets[j]:
                a = a - self.offsets[j]
            out[name] = a
        return out

    def parameter_list(self):
        return _list(self.params[0])

    def set_parameters(self, dict weights, bint strict=True):
        """Replace adapter arrays by name (as parameters() names them); shapes
        must match; with strict, every adapter must be given and no other name."""
        names = self.parameter_names()
        index = {n: i for i, n in enumerate(names)}
        unknown = [k for k in weights if k not in index]
        if unknown:
            raise ValueError(f"LoRA: not an adapter parameter of this model: {unknown[:5]}")
        if strict:
            missing = [n for n in names if n not in weights]
            if missing:
                raise ValueError(f"LoRA: missing adapter parameters: {missing[:5]}")
        cdef Array a
        cdef size_t i
        for k, v in weights.items():
            i = index[k]
            a = v if isinstance(v, Array) else to_array(np.asarray(v))
            if self.per == 1 and self.offsets[i]:
                a = a.astype(_core.float32) + self.offsets[i]
            want = tuple(self.params[0][i].shape(d) for d in range(self.params[0][i].ndim()))
            if tuple(a.shape) != want:
                raise ValueError(f"LoRA: {k} has shape {tuple(a.shape)}, expected {want}")
            self.params[0][i] = nnn.astype(handle(a)[0], self.params[0][i].dtype())
        ev = vector[na.array](self.params[0])
        with nogil:
            ntr.eval(ev)
        if not self.merged:
            self._install(self.params[0])

    def config(self):
        """mlx-lm's adapter_config.json fields for these adapters."""
        if self.fine_tune_type == "full":
            return {"fine_tune_type": "full", "num_layers": self.num_layers,
                    "lora_parameters": None}
        return {"fine_tune_type": self.fine_tune_type, "num_layers": self.num_layers,
                "lora_parameters": {"rank": self.rank, "scale": self.scale,
                                    "dropout": self.dropout, "keys": list(self.keys)}}

    # -- merge / unmerge / fuse ------------------------------------------------------
    def delta(self, int j):
        """scale * (A @ B).T for adapter j, float32 [out, in]."""
        if self.per == 1:
            raise ValueError("LoRA: full fine-tuning has no low-rank deltas")
        cdef int o = self.per * j
        cdef na.array d = nnn.transpose(nnn.matmul(nnn.astype(self.params[0][o], na.float32),
                                                   nnn.astype(self.params[0][o + 1],
                                                              na.float32)),
                                        [1, 0])
        return wrap(heap(nnn.multiply(d, nnn.scalar(self.scale, na.float32))))

    def fused_weights(self, bint dequantize=False):
        """{'model.layers.N.<key>.weight' (+ '.scales', '.biases'): Array} with the
        adapters folded in: W + scale * B.T A.T in W's dtype; quantized bases are
        dequantized, merged and requantized with their group size and bits
        (unless dequantize). Uses the unmerged base weights."""
        out = {}
        if self.per == 1:       # full: the trained tensors themselves
            out = self.parameters()
            _core_eval(out)
            return out
        for j, (name, lin) in enumerate(zip(self.names, self.layers)):
            if self.per == 3:
                base = self.bases[j]
            else:
                base = self.originals.get(name) or (<Linear>lin).base_arrays()
            l = <Linear>lin
            quantized = "scales" in base
            if self.per == 3:
                fused = self.dora_weight(j)
            elif quantized:
                w = _dequantize(base["weight"], base["scales"], base.get("biases"),
                                l.group_size, l.bits)
                fused = (w.astype(_core.float32) + self.delta(j)).astype(w.dtype)
            else:
                w = base["weight"]
                fused = (w.astype(_core.float32) + self.delta(j)).astype(w.dtype)
            if quantized:
                if dequantize:
                    out[name + ".weight"] = fused
                else:
                    wq, sc, bi = _quantize(fused, l.group_size, l.bits)
                    out[name + ".weight"], out[name + ".scales"] = wq, sc
                    out[name + ".biases"] = bi.astype(sc.dtype)
            else:
                out[name + ".weight"] = fused
        _core_eval(out)
        return out

    def dora_weight(self, int j):
        """DoRA layer j's fused weight (mlx-lm's DoRALinear.fuse): V = W + scale *
        (A B).T, then m / ||V||_row times V, in W's dtype."""
        if self.per != 3:
            raise ValueError("LoRA: not DoRA adapters")
        w = <Array>self.dweights[j]
        v = w.astype(_core.float32) + self.delta(j)
        m = _list(self.params[0])[3 * j + 2].astype(_core.float32)
        norm = ((v * v).sum(axis=1)) ** 0.5
        return ((m / norm).reshape(-1, 1) * v).astype(w.dtype)

    def merge(self):
        """Fold the adapters into the base weights (quantized bases are
        requantized: lossy); the original weights are kept for unmerge()."""
        if self.merged:
            return
        if self.per == 1:
            return          # full: the model holds the trained weights already
        fused = self.fused_weights()
        cdef Linear lin
        for j, (name, l) in enumerate(zip(self.names, self.layers)):
            lin = <Linear>l
            self.originals[name] = self.bases[j] if self.per == 3 else lin.base_arrays()
            _set_base(lin, fused[name + ".weight"], fused.get(name + ".scales"),
                      fused.get(name + ".biases"))
            if self.per == 3:
                lin.quantized = name + ".scales" in fused
            lin.clear_lora()
        self.merged = True

    def unmerge(self):
        """Restore the original base weights and re-attach the adapters."""
        if not self.merged:
            return
        cdef Linear lin
        for j, (name, l) in enumerate(zip(self.names, self.layers)):
            lin = <Linear>l
            o = self.originals[name]
            if self.per == 3:           # the adapted layer runs its float weight
                _set_linear(lin, self.dweights[j], None, None, False)
            else:
                _set_base(lin, o["weight"], o.get("scales"), o.get("biases"))
        self.originals = {}
        self.merged = False
        self._install(self.params[0])

    def fuse(self):
        """merge() for good: the originals are dropped and the adapters removed;
        returns the model (now a plain model with updated weights)."""
        self.merge()
        self.originals = {}
        return self.model


cdef _set_base(Linear lin, Array w, Array scales, Array biases):
    _del(&lin.weight)
    lin.weight = new na.array(handle(w)[0])
    if scales is not None:
        _del(&lin.scales)
        lin.scales = new na.array(handle(scales)[0])
    if biases is not None:
        _del(&lin.qbiases)
        lin.qbiases = new na.array(handle(biases)[0])


cdef _set_linear(Linear lin, Array w, Array scales, Array biases, bint quantized):
    """Replace a Linear's weight (and its quantization arrays: None drops them)."""
    _del(&lin.weight)
    lin.weight = new na.array(handle(w)[0])
    _del(&lin.scales)
    _del(&lin.qbiases)
    if scales is not None:
        lin.scales = new na.array(handle(scales)[0])
    if biases is not None:
        lin.qbiases = new na.array(handle(biases)[0])
    lin.quantized = quantized


cdef _restore(Linear lin, dict base):
    """A DoRA layer back to the base arrays it was built with."""
    _set_linear(lin, base["weight"], base.get("scales"), base.get("biases"),
                "scales" in base)


cdef Array _float_weight(Linear lin, dict base):
    """The layer's weight as floats (dequantized when quantized), evaluated."""
    if "scales" not in base:
        return base["weight"]
    w = _dequantize(base["weight"], base["scales"], base.get("biases"), lin.group_size,
                    lin.bits)
    _core_eval({"w": w})
    return w


def _core_eval(d):
    from mlxcy.transforms import eval as _eval
    _eval(list(d.values()))


# ------------------------------------------------------------- training -----

cdef class _Fn:
    """Owns an ArrayFn (a native closure, possibly wrapped by checkpoint)."""
    cdef ArrayFn* fn

    def __dealloc__(self):
        if self.fn != NULL:
            del self.fn
            self.fn = NULL


cdef class _BlockCk:
    """Checkpointed forward of one block: inputs [h, A0, B0, ...] -> [block(h)]."""
    cdef TrainStep owner
    cdef Block blk
    cdef size_t first, count
    cdef _Fn fn


cdef vector[na.array] _block_fn(const vector[na.array]& inputs, void* ctx) except *:
    cdef _BlockCk c = <_BlockCk>ctx
    c.owner.lora._install_range(inputs, 1, c.first, c.count)
    cdef vector[na.array] out = vector[na.array]()
    out.push_back(nnn.own(c.blk.forward(inputs[0], None, NULL, NULL)))
    return out


cdef vector[na.array] _loss_fn(const vector[na.array]& inputs, void* ctx) except *:
    return (<TrainStep>ctx).loss_outputs(inputs)


cdef vector[na.array] _vg_fn(const vector[na.array]& inputs, void* ctx) except *:
    """[params..., x, y, mask] -> [loss, ntoks, grads...]: the function that
    TrainStep compiles (ctx is borrowed: the compiled function lives and dies
    with its TrainStep)."""
    cdef TrainStep st = <TrainStep>ctx
    cdef size_t P = st.lora.params[0].size(), i
    cdef vector[na.array] params = vector[na.array]()
    for i in range(P):
        params.push_back(inputs[i])
    st.batch[0].clear()
    for i in range(P, P + 3):
        st.batch[0].push_back(inputs[i])
    cdef vector[na.array] out = vector[na.array]()
    cdef vector[na.array] grads = vector[na.array]()
    st._vg_traced(params, &out, &grads)
    for i in range(grads.size()):
        out.push_back(grads[i])
    return out


# memory_limit="auto" applies on GPUs only: there the host encodes kernels far
# ahead of the device, and every kernel's inputs stay allocated until its
# command batch completes, so buffers in flight add to the live arrays (an
# H200, SmolLM2 shape, bf16 batch 8 x 256: peak 1.69 GB unbounded, 1.39 GB with
# MLX's limit at 1.3 GB, same speed).  The CPU's peak was already below
# mlx-lm's.  Tests switch it on for the CPU to exercise the bookkeeping.
AUTO_ON_CPU = False


cdef class TrainStep:
    """One optimizer step per call (or per `grad_accum` calls): loss and
    gradients of the adapters through a native closure, optional global-norm
    clipping, the optimizer's native update.

    step(ids, offsets=None, lengths=None) -> (loss float, ntoks int, updated bool)
    value_and_grad(ids, offsets, lengths) -> (loss Array, ntoks Array, [grad Arrays])
    evaluate(ids, offsets, lengths) -> (sum of token losses, ntoks)

    memory_limit bounds what a step holds on a GPU, where the buffers of
    command batches in flight add to the live arrays: MLX's memory limit is
    lowered while the step evaluates (and restored after), so that above it
    MLX waits for batches in flight before encoding more.  "auto" (the
    default): the first step of each batch shape runs with the limit at the
    resident memory (one batch in flight at a time), which measures the
    step's live set; later steps of that shape get the resident memory plus
    (1 + memory_margin) times that live set (margin 0 by default: on an
    H200, margins 0 / 0.1 / 0.25 / 0.5 gave bf16 peaks of 1.39 / 1.50 /
    1.60 / 1.67 GB against 1.67 unbounded).  An int: that many bytes.
    None: MLX's limit untouched.  "auto" does nothing on the CPU.  MLX's
    limit is process-wide: other threads' evaluations see the lowered limit
    while a step runs.
    """
    cdef readonly LoRA lora
    cdef readonly Optimizer optimizer
    cdef readonly bint grad_checkpoint
    cdef readonly double clip
    cdef readonly int grad_accum
    cdef int count
    cdef vector[na.array]* acc
    cdef Array x, y, mask
    cdef list blocks                # _BlockCk per block (grad_checkpoint)
    cdef readonly object last_grad_norm
    cdef vector[na.array]* batch    # [x, y, mask] as the loss sees them (tracers when compiling)
    cdef readonly bint compile
    cdef Compiled* compiled         # loss and gradients, compiled (see _vg)
    cdef _Fn vg_fn
    cdef readonly object memory_limit   # "auto", bytes, or None
    cdef readonly double memory_margin
    cdef readonly dict live_bytes       # "auto": (kind, batch shape) -> measured live set

    def __cinit__(self, *args, **kwargs):
        self.acc = new vector[na.array]()
        self.batch = new vector[na.array]()

    def __dealloc__(self):
        if self.compiled != NULL:
            del self.compiled
            self.compiled = NULL
        if self.acc != NULL:
            del self.acc
            self.acc = NULL
        if self.batch != NULL:
            del self.batch
            self.batch = NULL

    def __init__(self, LoRA lora, Optimizer optimizer=None, bint grad_checkpoint=False,
                 double clip_grad_norm=0.0, int grad_accum=1, bint compile=True,
                 memory_limit="auto", double memory_margin=0.0):
        if grad_accum < 1:
            raise ValueError(f"grad_accum must be >= 1, got {grad_accum}")
        if not (memory_limit is None or memory_limit == "auto"
                or (isinstance(memory_limit, numbers.Integral)
                    and not isinstance(memory_limit, bool) and memory_limit > 0)):
            raise ValueError(f"memory_limit must be 'auto', None or a number of bytes > 0, "
                             f"got {memory_limit!r}")
        if not (memory_margin >= 0):
            raise ValueError(f"memory_margin must be >= 0, got {memory_margin}")
        self.memory_limit = memory_limit if memory_limit in (None, "auto") else int(memory_limit)
        self.memory_margin = memory_margin
        self.live_bytes = {}
        if grad_checkpoint and lora.dropout > 0:
            raise ValueError("grad_checkpoint with LoRA dropout > 0 is not supported: the "
                             "recomputed forward pass would draw new dropout masks")
        self.lora, self.optimizer = lora, optimizer
        self.grad_checkpoint = grad_checkpoint
        self.clip = clip_grad_norm
        self.grad_accum = grad_accum
        # compile: the loss and its gradients run as one compiled MLX function
        # (elementwise chains fused, fewer intermediate buffers), traced once
        # per batch shape.  Never with LoRA dropout (a traced graph would
        # replay the same dropout masks).  On by default: on the CPU it
        # cut SmolLM2's bf16 training peak from 0.57 to 0.47 GB at the same
        # speed; on an H200 it ran 1.5x mlx-lm's speed.  A CUDA GPU's first step
        # of each new batch shape builds its fused kernels with NVRTC (~60 s for
        # SmolLM2 on an empty kernel cache, as for mlx-lm's compiled step; 0.6 s
        # once MLX's on-disk PTX cache holds them).
        self.compile = compile and lora.dropout == 0
        self.blocks = []
        if grad_checkpoint:
            self._build_checkpoints()

    def _build_checkpoints(self):
        cdef _BlockCk c
        cdef _Fn raw
        model = self.lora.model
        first = {}
        counts = {}
        for j, b in enumerate(self.lora.block_of):
            first.setdefault(b, j)
            counts[b] = counts.get(b, 0) + 1
        for i in range(len(model.layers)):
            c = _BlockCk.__new__(_BlockCk)
            c.owner = self
            c.blk = <Block>model.layers[i]
            c.first = first.get(i, 0)
            c.count = counts.get(i, 0)
            raw = _Fn.__new__(_Fn)
            raw.fn = ntr.native_closure(_block_fn, <void*>c, <PyObject*>c)
            c.fn = _Fn.__new__(_Fn)
            c.fn.fn = ntr.checkpoint(raw.fn[0])
            self.blocks.append(c)

    cdef vector[na.array] loss_outputs(self, const vector[na.array]& inputs) except *:
        cdef LoRA lora = self.lora
        cdef Model model = lora.model
        lora._install(inputs)
        cdef na.array* logits
        if self.grad_checkpoint:
            logits = self._ck_forward(inputs)
        else:
            logits = model.forward(self.batch[0][0], None, NULL, NULL, False)
        cdef na.array lg = nnn.own(logits)
        return masked_ce(lg, self.batch[0][1], self.batch[0][2])

    cdef na.array* _ck_forward(self, const vector[na.array]& params) except NULL:
        cdef Model model = self.lora.model
        cdef _BlockCk c
        cdef size_t k
        cdef vector[na.array] ins
        cdef vector[na.array] outs
        cdef na.array* nh
        cdef na.array* h = model.embed_tokens(self.batch[0][0])
        try:
            for c in self.blocks:
                ins = vector[na.array]()
                ins.push_back(h[0])
                for k in range(self.lora.per * c.first, self.lora.per * (c.first + c.count)):
                    ins.push_back(params[k])
                outs = ntr.call(c.fn.fn[0], ins)
                nh = new na.array(outs[0])
                del h
                h = nh
            nh = model.head(h[0])
        finally:
            del h
        return nh

    cdef int _set_batch(self, ids, offsets, lengths) except -1:
        x, y, m = make_batch_arrays(ids, offsets, lengths)
        vocab = self.lora.model.config.vocab_size
        if x.min() < 0 or max(int(x.max()), int(y.max())) >= vocab:
            raise ValueError(f"batch: token ids outside the vocabulary [0, {vocab})")
        self.x, self.y, self.mask = to_array(x), to_array(y), to_array(m)
        self._set_batch_arrays()
        return 0

    cdef void _set_batch_arrays(self) except *:
        self.batch[0].clear()
        self.batch[0].push_back(handle(self.x)[0])
        self.batch[0].push_back(handle(self.y)[0])
        self.batch[0].push_back(handle(self.mask)[0])

    cdef int _vg_traced(self, const vector[na.array]& params,
                        vector[na.array]* value, vector[na.array]* grads) except -1:
        cdef vector[int] argnums = vector[int]()
        cdef size_t i
        for i in range(params.size()):
            argnums.push_back(i)
        cdef _Fn f = _Fn.__new__(_Fn)
        f.fn = ntr.native_closure(_loss_fn, <void*>self, <PyObject*>self)
        cdef pair[vector[na.array], vector[na.array]] r = ntr.value_and_grad(f.fn[0], params,
                                                                             argnums)
        value[0] = r.first
        grads[0] = r.second
        return 0

    cdef pair[vector[na.array], vector[na.array]] _vg(self) except *:
        cdef vector[na.array] value = vector[na.array]()
        cdef vector[na.array] grads = vector[na.array]()
        try:
            if not self.compile:
                self._vg_traced(self.lora.params[0], &value, &grads)
            else:
                self._vg_compiled(&value, &grads)
        finally:
            # never leave tracers in the layers or the batch
            self.lora._install(self.lora.params[0])
            self._set_batch_arrays()
        return pair[vector[na.array], vector[na.array]](value, grads)

    cdef int _vg_compiled(self, vector[na.array]* value, vector[na.array]* grads) except -1:
        cdef size_t i
        if self.compiled == NULL:
            self.vg_fn = _Fn.__new__(_Fn)
            self.vg_fn.fn = ntr.native_closure(_vg_fn, <void*>self, NULL)
            self.compiled = new Compiled(self.vg_fn.fn[0], <uintptr_t><void*>self, False)
        cdef vector[na.array] ins = vector[na.array](self.lora.params[0])
        for i in range(3):
            ins.push_back(self.batch[0][i])
        cdef vector[na.array] outs = self.compiled.call(ins, 0)
        value.push_back(outs[0])
        value.push_back(outs[1])
        for i in range(2, outs.size()):
            grads.push_back(outs[i])
        return 0

    cdef void _eval(self, vector[na.array]& arrays, str kind) except *:
        """Evaluate a step's arrays under memory_limit (see the class doc)."""
        cdef size_t resident = 0, cap = 0, old = 0
        cdef bint auto = self.memory_limit == "auto"
        key = None
        if auto and (AUTO_ON_CPU or na.default_device().type != na.cpu):
            resident = nmem.get_active_memory()
            key = (kind, tuple(self.x.shape))
            live = self.live_bytes.get(key)
            # an unmeasured shape: one batch in flight at a time (the limit at
            # the resident memory), which measures the live set
            cap = resident if live is None else \
                resident + <size_t>((1.0 + self.memory_margin) * live)
        elif not auto and self.memory_limit is not None:
            cap = self.memory_limit
        if cap:
            old = nmem.set_memory_limit(min(max(cap, <size_t>1), nmem.get_memory_limit()))
        try:
            with nogil:
                ntr.eval(arrays)
        finally:
            if cap:
                nmem.set_memory_limit(old)
        if key is not None and key not in self.live_bytes:
            # the peak since start is this step's peak or an earlier, higher
            # one: either way an upper bound of the live set
            self.live_bytes[key] = max(0, <long long>nmem.get_peak_memory() - <long long>resident)

    def value_and_grad(self, ids, offsets=None, lengths=None):
        """(loss, ntoks, grads): no update; grads in parameter_names() order."""
        self._set_batch(ids, offsets, lengths)
        cdef pair[vector[na.array], vector[na.array]] r = self._vg()
        cdef vector[na.array] ev = vector[na.array](r.first)
        cdef size_t i
        for i in range(r.second.size()):
            ev.push_back(r.second[i])
        self._eval(ev, "grad")
        return wrap(new na.array(r.first[0])), wrap(new na.array(r.first[1])), _list(r.second)

    def __call__(self, ids, offsets=None, lengths=None):
        return self.step(ids, offsets, lengths)

    def step(self, ids, offsets=None, lengths=None):
        """Forward + backward on one batch; applies the update every
        grad_accum calls. Returns (loss, ntoks, updated)."""
        if self.optimizer is None:
            raise ValueError("TrainStep: no optimizer given")
        self._set_batch(ids, offsets, lengths)
        self.lora.train(True)
        cdef pair[vector[na.array], vector[na.array]] r = self._vg()
        cdef vector[na.array] g
        cdef vector[na.array] nrm = vector[na.array]()
        cdef vector[na.array] ev = vector[na.array](r.first)
        cdef size_t i
        updated = False
        self.acc[0] = add_all(self.acc[0], r.second)
        self.count += 1
        if self.count >= self.grad_accum:
            g = self.acc[0] if self.grad_accum == 1 else scale_all(self.acc[0],
                                                                    1.0 / self.grad_accum)
            if self.clip > 0:
                g = clip_global_norm(g, self.clip, nrm)
            self.optimizer.apply(self.lora.params[0], g)
            self.lora._install(self.lora.params[0])
            self.acc[0].clear()
            self.count = 0
            updated = True
            for i in range(self.lora.params[0].size()):
                ev.push_back(self.lora.params[0][i])
            self.optimizer.state_arrays(ev)
            if nrm.size():
                ev.push_back(nrm[0])
        else:
            for i in range(self.acc[0].size()):
                ev.push_back(self.acc[0][i])
        self._eval(ev, "step")
        self.last_grad_norm = float(wrap(new na.array(nrm[0])).item()) if nrm.size() else None
        return float(wrap(new na.array(r.first[0])).item()), \
            int(wrap(new na.array(r.first[1])).item()), updated

    def evaluate(self, ids, offsets=None, lengths=None):
        """(sum of the counted tokens' losses, their number) without gradients."""
        self._set_batch(ids, offsets, lengths)
        self.lora.train(False)
        cdef Model model = self.lora.model
        cdef na.array lg = nnn.own(model.forward(handle(self.x)[0], None, NULL, NULL, False))
        cdef vector[na.array] r = masked_ce(lg, handle(self.y)[0], handle(self.mask)[0])
        self._eval(r, "evaluate")
        n = int(wrap(new na.array(r[1])).item())
        return float(wrap(new na.array(r[0])).item()) * n, n
