# cython: language_level=3, cpp_locals=True
"""The decoder shared by mlxcy's model families: RoPE variants, attention
(GQA through the fused kernel, or composed when logits are soft-capped),
MLP, pre-norm block, and Model with its cdef forward over native arrays.

Model builds the layers its family's spec lays out (mlxcy/models/spec.py,
mlxcy/models/families/); families whose forward differs subclass it
(gemma3.pyx: Gemma's block, embedding scale and logit soft-capping).
"""
import math

import numpy as np

from libc.stdint cimport int64_t
from libcpp cimport bool as cbool
from libcpp.vector cimport vector

from mlxcy.core cimport Array, wrap, handle, to_array
from mlxcy.native cimport array as na
from mlxcy.native cimport nn as nnn
from mlxcy.native cimport fast as nfast
from mlxcy.native cimport fused as nfused
from mlxcy.native cimport gpu_step as ngs
from mlxcy.native cimport ops as nops
from mlxcy.native.array cimport heap, shape1
from mlxcy.nn cimport Linear, Embedding, RMSNorm, set_eval_blocks
from mlxcy.models.cache cimport LayerCache, Cache, KVCache, RotatingKVCache
from mlxcy.tuning cimport Tuning, current
from mlxcy.cpu_kernels cimport (use_attention, cpu_attention, use_activation, cpu_activation,
                                 use_block_kernels, kStepPositions, LinearArg, block_qkv_ok,
                                 block_qkv_run, block_mlp_ok, block_attn_mlp_run)

from mlxcy.core import Array as _Array
import mlxcy.core as _core
from mlxcy import cpu_kernels as _cpu_kernels


# Quantized CPU inference evaluates as it goes (mlxcy.tuning's cpu_sync says why).
cdef Tuning* _tuning = current()


# ------------------------------------------------------------------ RoPE ---

cdef class Rope:
    """Rotary embedding (non-traditional layout, as in HF checkpoints)."""

    def __init__(self, int dims, double theta, scaling=None, int max_position_embeddings=0):
        self.dims = dims
        self.base = theta
        self.scale = 1.0
        if scaling is None:
            return
        kind = scaling["rope_type"]
        factor = float(scaling["factor"])
        if kind == "linear":
            self.scale = 1.0 / factor
        elif kind == "dynamic":
            self.dyn_factor = factor
            self.dyn_max_pos = max_position_embeddings
        elif kind == "llama3":
            # transformers' _compute_llama3_parameters, in float32 as there
            inv = (1.0 / (np.float32(theta) ** (np.arange(0, dims, 2, dtype=np.int64)
                                                .astype(np.float32) / np.float32(dims))))
            inv = inv.astype(np.float32)
            low = scaling["low_freq_factor"]
            high = scaling["high_freq_factor"]
            old = scaling["original_max_position_embeddings"]
            low_wl, high_wl = old / low, old / high
            wl = (2 * math.pi / inv).astype(np.float32)
            inv_l = np.where(wl > low_wl, inv / np.float32(factor), inv).astype(np.float32)
            smooth = ((old / wl - low) / (high - low)).astype(np.float32)
            smoothed = ((1 - smooth) * inv_l / np.float32(factor) + smooth * inv_l)
            medium = ~(wl < high_wl) & ~(wl > low_wl)
            inv_f = np.where(medium, smoothed, inv_l).astype(np.float32)
            self.freqs = copy_native(to_array((1.0 / inv_f.astype(np.float64)).astype(np.float32)))
            self.base = 0
        else:
            raise ValueError(f"rope: unsupported rope type {kind!r}")

    def __dealloc__(self):
        if self.freqs != NULL:
            del self.freqs
            self.freqs = NULL

    cpdef free(self):
        if self.freqs != NULL:
            del self.freqs
            self.freqs = NULL

    cdef na.array* apply(self, const na.array& x, int offset, const na.array* offsets) except NULL:
        cdef double base = self.base
        cdef long long seq_len
        if self.dyn_factor > 0:
            seq_len = offset + x.shape(2)
            if seq_len > self.dyn_max_pos:
                base = self.base * ((self.dyn_factor * seq_len / self.dyn_max_pos)
                                    - (self.dyn_factor - 1)) ** (self.dims / (self.dims - 2.0))
        if offsets != NULL:
            return heap(nfast.rope_offsets(x, self.dims, False, base, self.scale, offsets[0],
                                           self.freqs))
        return heap(nfast.rope(x, self.dims, False, base, self.scale, offset, self.freqs))


cdef na.array* copy_native(Array a) except NULL:
    return new na.array(handle(a)[0])


# ------------------------------------------------------------- attention ---

cdef inline int _cache_window(int window, LayerCache cache) noexcept:
    """The attention window over cache: the layer's, or the cache's own
    (a rotating cache) where that is narrower."""
    if cache.window > 0 and (window == 0 or cache.window < window):
        return cache.window
    return window


cdef inline int _mask_kind(int window, int L, int qstart, int kstart) noexcept:
    """build_mask's kind for L queries from qstart over ordered keys from
    kstart: 2 once the window cuts off keys, 1 (causal) for several queries,
    else 0."""
    if window > 0 and (qstart + L - 1) - kstart >= window:
        return 2
    if L > 1:
        return 1
    return 0


cdef class Attention:

    def __init__(self, Linear q_proj, Linear k_proj, Linear v_proj, Linear o_proj,
                 Rope rope, int n_heads, int n_kv_heads, int head_dim, float scale,
                 RMSNorm q_norm=None, RMSNorm k_norm=None, int window=0, float softcap=0):
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = q_proj, k_proj, v_proj, o_proj
        self.rope = rope
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, head_dim
        self.scale = scale
        self.q_norm, self.k_norm = q_norm, k_norm
        self.window = window
        self.softcap = softcap

    cpdef free(self):
        for m in (self.q_proj, self.k_proj, self.v_proj, self.qkv_proj, self.o_proj, self.q_norm,
                  self.k_norm, self.rope, self.qk_norm_w):
            if m is not None:
                m.free()
        self.qk_norm_w = None

    def _join_qk_norms(self):
        """The per-head weights of q_norm and k_norm side by side, [H + Hkv, 1, D],
        so that one weightless RMSNorm and one multiply normalize the q and k heads
        of the fused projection together (3 kernels with the joint RoPE instead
        of 4: two norms, two RoPEs)."""
        cdef int D = self.head_dim
        cdef vector[na.array] parts = vector[na.array]()
        parts.push_back(nnn.broadcast_to(nnn.reshape(self.q_norm.weight[0], na.shape3(1, 1, D)),
                                         na.shape3(self.n_heads, 1, D)))
        parts.push_back(nnn.broadcast_to(nnn.reshape(self.k_norm.weight[0], na.shape3(1, 1, D)),
                                         na.shape3(self.n_kv_heads, 1, D)))
        self.qk_norm_w = wrap(heap(nnn.concatenate(parts, 0)))
        self.qk_norm_w.eval()

    cdef na.array* forward(self, const na.array& x, LayerCache cache, const na.array* mask,
                           const na.array* offsets) except NULL:
        cdef na.array o = nnn.own(self.core(x, cache, mask, offsets))
        return self.o_proj.forward(o)

    cdef na.array* core(self, const na.array& x, LayerCache cache, const na.array* mask,
                        const na.array* offsets) except NULL:
        """Attention up to (not including) o_proj: [B, L, heads * head_dim]."""
        cdef int L = x.shape(1)
        cdef int offset = 0 if cache is None else cache.offset
        cdef int window = self.window
        cdef int kstart = 0
        cdef int H = self.n_heads, Hkv = self.n_kv_heads
        cdef int nq = H * self.head_dim, nk = Hkv * self.head_dim
        # Prefill (more than one position) runs the parts of fused q/k/v weights
        # as separate matmuls over views of the fused weight: separate outputs
        # are freed part by part, where the fused output of a 512-token chunk
        # stays alive until its last slice is consumed (and, on CUDA, until its
        # command batch completes).  Decode keeps the single fused matmul: the
        # kernel count is what costs there.
        cdef bint parts = self.qkv_proj is not None and L > 1
        cdef bint fused = self.qkv_proj is not None and not parts
        cdef na.array q = nnn.own(self.qkv_proj.forward(x)) if fused else x
        cdef na.array k = q
        cdef na.array v = q
        if fused:
            # One matmul for q, k and v, viewed as [B, H + 2 Hkv, L, D]; the q and
            # k heads are normalized (Qwen3, Gemma 3: their weights joined by
            # fuse()) and rotated in one call each: one kernel fewer per layer.
            v = nnn.heads_first(q, H + 2 * Hkv, self.head_dim)
            k = nnn.heads_slice(v, 0, H + Hkv)
            if self.q_norm is not None:
                k = nnn.multiply(nfast.rms_norm(k, NULL, self.q_norm.eps),
                                 handle(self.qk_norm_w)[0])
            k = nnn.own(self.rope.apply(k, offset, offsets))
            q = nnn.heads_slice(k, 0, H)
            k = nnn.heads_slice(k, H, H + Hkv)
            v = nnn.heads_slice(v, H + Hkv, H + 2 * Hkv)
        else:
            if parts:
                q = nnn.own(self.qkv_proj.forward_rows(x, 0, nq))
                k = nnn.own(self.qkv_proj.forward_rows(x, nq, nq + nk))
                v = nnn.own(self.qkv_proj.forward_rows(x, nq + nk, nq + 2 * nk))
            else:
                q = nnn.own(self.q_proj.forward(x))
                k = nnn.own(self.k_proj.forward(x))
                v = nnn.own(self.v_proj.forward(x))
            q = nnn.heads_first(q, H, self.head_dim)
            k = nnn.heads_first(k, Hkv, self.head_dim)
            v = nnn.heads_first(v, Hkv, self.head_dim)
            if self.q_norm is not None:
                q = nnn.own(self.q_norm.forward(q))
                k = nnn.own(self.k_norm.forward(k))
            q = nnn.own(self.rope.apply(q, offset, offsets))
            k = nnn.own(self.rope.apply(k, offset, offsets))
        cdef na.array* o
        if cache is None:
            o = self.attend(q, k, v, L, 0, 0, window, mask)
        else:
            window = _cache_window(window, cache)
            cache.update(k, v, mask != NULL or L > 1)
            try:
                o = self.attend(q, cache.out_k[0], cache.out_v[0], L, offset,
                                cache.out_start, window, mask)
            finally:
                cache.drop_outputs()
        return heap(nnn.heads_merge(nnn.own(o)))

    cdef na.array* attend(self, const na.array& q, const na.array& k, const na.array& v,
                          int L, int qstart, int kstart, int window,
                          const na.array* mask) except NULL:
        cdef int K = k.shape(2)
        cdef int kind = 0
        cdef cbool causal_mode = False
        cdef const na.array* mp = NULL
        cdef bint has_mask
        cdef na.array m = k      # placeholder; replaced by build_mask
        if kstart >= 0:
            kind = _mask_kind(window, L, qstart, kstart)
        elif mask != NULL:
            raise RuntimeError("attention: an unordered cache cannot take a mask")
        has_mask = nnn.build_mask(kind, L, qstart, K, kstart, window, mask, q.dtype(),
                                  self.softcap <= 0, &causal_mode, &m)
        if has_mask:
            mp = &m
        if self.softcap <= 0 and use_attention(q, k, v, mp):
            return cpu_attention(q, k, v, self.scale, causal_mode, mp)   # mlxcy.cpu_kernels
        if self.softcap > 0:
            return heap(nnn.attention_softcap(q, k, v, self.scale, self.softcap, mp))
        if causal_mode:
            return heap(nfast.sdpa(q, k, v, self.scale, b"causal", NULL, NULL))
        return heap(nfast.sdpa(q, k, v, self.scale, b"", mp, NULL))


# ------------------------------------------------------------------- MLP ---

cdef class MLP:

    def __init__(self, Linear gate_proj, Linear up_proj, Linear down_proj, bint gelu=False):
        self.gate_proj, self.up_proj, self.down_proj = gate_proj, up_proj, down_proj
        self.gelu = gelu

    cpdef free(self):
        for m in (self.gate_proj, self.up_proj, self.gate_up_proj, self.down_proj):
            if m is not None:
                m.free()

    cdef na.array* forward(self, const na.array& x) except NULL:
        cdef na.array u = nnn.own(self.hidden(x))
        return self.down_proj.forward(u)

    cdef na.array* hidden(self, const na.array& x) except NULL:
        """The MLP up to (not including) down_proj: act(gate) * up."""
        cdef int inter = self.down_proj.in_features
        cdef na.array g = x
        cdef na.array u = x
        if self.gate_up_proj is None:
            g = nnn.own(self.gate_proj.forward(x))
            u = nnn.own(self.up_proj.forward(x))
        elif x.ndim() == 3 and x.shape(1) > 1:   # prefill: by parts, as in Attention.core
            g = nnn.own(self.gate_up_proj.forward_rows(x, 0, inter))
            u = nnn.own(self.gate_up_proj.forward_rows(x, inter, 2 * inter))
        else:   # one matmul for gate and up
            u = nnn.own(self.gate_up_proj.forward(x))
            g = nfused.last_axis_slice(u, 0, inter)
            u = nfused.last_axis_slice(u, inter, 2 * inter)
        if use_activation(g, u):                  # mlxcy.cpu_kernels
            return cpu_activation(g, u, 1 if self.gelu else 0)
        # The activation and product run as one compiled kernel.
        if self.gelu:
            return heap(nfused.geglu_tanh(g, u))
        return heap(nfused.swiglu(g, u))


# ----------------------------------------------------------------- block ---

cdef class Block:
    """Pre-norm block: h = x + attn(norm(x)); out = h + mlp(norm(h)).
    Gemma's sandwich-norm block overrides forward (pre_ff/post_ff norms)."""

    def __init__(self, Attention attn, MLP mlp, RMSNorm input_norm, RMSNorm post_attn_norm,
                 RMSNorm pre_ff_norm=None, RMSNorm post_ff_norm=None):
        self.attn, self.mlp = attn, mlp
        self.input_norm, self.post_attn_norm = input_norm, post_attn_norm
        self.pre_ff_norm, self.post_ff_norm = pre_ff_norm, post_ff_norm

    cpdef free(self):
        self.attn.free()
        self.mlp.free()
        for m in (self.input_norm, self.post_attn_norm, self.pre_ff_norm, self.post_ff_norm):
            if m is not None:
                m.free()

    def parts(self):
        """Every weight-holding layer of the block (fused or not)."""
        a, m = self.attn, self.mlp
        return [l for l in (a.q_proj, a.k_proj, a.v_proj, a.qkv_proj, a.o_proj, a.q_norm,
                            a.k_norm, m.gate_proj, m.up_proj, m.gate_up_proj, m.down_proj,
                            self.input_norm, self.post_attn_norm, self.pre_ff_norm,
                            self.post_ff_norm) if l is not None]

    def nparams(self):
        return sum(l.nparams() for l in self.parts())

    def nbytes(self):
        return sum(l.nbytes() for l in self.parts())

    def fuse(self):
        """Concatenate q/k/v and gate/up weights (fewer matmuls per token)."""
        a, m = self.attn, self.mlp
        if a.qkv_proj is None and a.q_proj is not None:
            fused = fuse_linears([a.q_proj, a.k_proj, a.v_proj])
            if fused is not None:
                for l in (a.q_proj, a.k_proj, a.v_proj):
                    l.free()
                a.qkv_proj, a.q_proj, a.k_proj, a.v_proj = fused, None, None, None
                if a.q_norm is not None:
                    a._join_qk_norms()
        if m.gate_up_proj is None and m.gate_proj is not None:
            fused = fuse_linears([m.gate_proj, m.up_proj])
            if fused is not None:
                m.gate_proj.free()
                m.up_proj.free()
                m.gate_up_proj, m.gate_proj, m.up_proj = fused, None, None

    cdef na.array* forward(self, const na.array& x, LayerCache cache, const na.array* mask,
                           const na.array* offsets) except NULL:
        cdef na.array* fused = NULL
        if cpu_block_step(self, x, cache, mask, offsets, False, &fused):
            return fused      # mlxcy.cpu_kernels: a decode step in two primitives
        cdef na.array h = nnn.own(self.input_norm.forward(x))
        cdef na.array r = nnn.own(self.attn.forward(h, cache, mask, offsets))
        h = nnn.add(x, r)
        r = nnn.own(self.post_attn_norm.forward(h))
        r = nnn.own(self.mlp.forward(r))
        return heap(nnn.add(h, r))


cdef bint _linear_arg(Linear l, LinearArg* a) noexcept:
    """A layer's operands for mlxcy.cpu_kernels' block primitives (False when it
    has a LoRA adapter, was freed, or is a subclass: mlxcy.distributed's
    AllSumLinear/GatherLinear communicate in forward, which the primitives
    would skip)."""
    if l is None or type(l) is not Linear or l.weight == NULL or l.lora_a != NULL:
        return False
    a.w = l.weight
    a.bias = l.bias
    if l.quantized:
        if l.qbiases == NULL:
            return False
        a.scales = l.scales
        a.biases = l.qbiases
        a.gs = l.group_size
        a.bits = l.bits
    return True


cdef bint _add_linear(vector[LinearArg]& v, Linear l) noexcept:
    cdef LinearArg a = LinearArg()
    if not _linear_arg(l, &a):
        return False
    v.push_back(a)
    return True


cdef bint _unmasked_step(Attention a, LayerCache cache) noexcept:
    """Would Attention.attend, for one new position over this cache, attend
    with no mask?  (As its window logic: a KVCache past the layer's window
    needs the sliding mask; a rotating cache's one-token views never do.)"""
    cdef int window = a.window, kstart, f
    cdef RotatingKVCache rc
    if cache.window > 0 and (window == 0 or cache.window < window):
        window = cache.window
    if window <= 0:
        return True
    if type(cache) is KVCache:
        kstart = 0
    else:
        rc = <RotatingKVCache>cache
        f = min(rc.filled + 1, rc.window)
        if f < rc.window:
            kstart = cache.offset + 1 - f
        elif (rc.idx + 1) % rc.window == 0:
            kstart = cache.offset + 1 - rc.window
        else:
            kstart = -1
    return kstart < 0 or cache.offset - kstart < window


cdef bint _cpu_block_step(Block blk, const na.array& x, LayerCache cache, const na.array* mask,
                          const na.array* offsets, bint sandwich, na.array** out) except -1:
    """A step of a pre-norm block (Llama/Qwen2/Mistral; sandwich: Gemma's norms
    after attention and after the MLP) over a KVCache or RotatingKVCache, by
    mlxcy.cpu_kernels' two block primitives (include/mlxcy/cpu_block.h); a
    batch's padding mask and per-row RoPE offsets go to the primitives as the
    op path would use them.  Returns False, touching nothing, when the block
    does not qualify (LoRA, soft-capping, unsupported layers or operands)."""
    cdef Attention a = blk.attn
    cdef MLP m = blk.mlp
    cdef Rope rope = a.rope
    cdef vector[LinearArg] qkv = vector[LinearArg](), gu = vector[LinearArg]()
    cdef LinearArg o = LinearArg(), dn = LinearArg()
    cdef RMSNorm n_mid = blk.pre_ff_norm if sandwich else blk.post_attn_norm
    cdef const na.array* n_o = NULL
    cdef const na.array* n_mlp = NULL
    cdef const na.array* qn = NULL
    cdef const na.array* kn = NULL
    cdef float qk_eps = 0
    if a.softcap > 0 or blk.input_norm.weight == NULL or n_mid is None or n_mid.weight == NULL:
        return False
    if sandwich:
        if blk.post_attn_norm.weight == NULL or blk.post_ff_norm is None \
                or blk.post_ff_norm.weight == NULL:
            return False
        n_o = blk.post_attn_norm.weight
        n_mlp = blk.post_ff_norm.weight
    if a.q_norm is not None:
        if a.q_norm.weight == NULL or a.k_norm.weight == NULL:
            return False
        qn, kn, qk_eps = a.q_norm.weight, a.k_norm.weight, a.q_norm.eps
    if mask == NULL and not _unmasked_step(a, cache):
        return False
    if a.qkv_proj is not None:
        if not _add_linear(qkv, a.qkv_proj):
            return False
    elif not (_add_linear(qkv, a.q_proj) and _add_linear(qkv, a.k_proj)
              and _add_linear(qkv, a.v_proj)):
        return False
    if m.gate_up_proj is not None:
        if not _add_linear(gu, m.gate_up_proj):
            return False
    elif not (_add_linear(gu, m.gate_proj) and _add_linear(gu, m.up_proj)):
        return False
    if not (_linear_arg(a.o_proj, &o) and _linear_arg(m.down_proj, &dn)):
        return False
    if not block_qkv_ok(x, blk.input_norm.weight[0], qkv, a.n_heads, a.n_kv_heads,
                        a.head_dim, rope.dims, rope.freqs, qn, kn, offsets):
        return False
    if not block_mlp_ok(x, a.n_heads * a.head_dim, o, n_o, n_mid.weight[0], gu, dn, n_mlp):
        return False
    cdef int offset = cache.offset
    cdef double base = rope.base
    if rope.dyn_factor > 0 and offset + 1 > rope.dyn_max_pos:   # as Rope.apply
        base = rope.base * ((rope.dyn_factor * (offset + 1) / rope.dyn_max_pos)
                            - (rope.dyn_factor - 1)) ** (rope.dims / (rope.dims - 2.0))
    cdef vector[na.array] qkvo = vector[na.array]()
    block_qkv_run(qkvo, x, blk.input_norm.weight[0], blk.input_norm.eps, qkv, a.n_heads,
                  a.n_kv_heads, a.head_dim, rope.dims, base, rope.scale, rope.freqs, qn, kn,
                  qk_eps, offset, offsets)
    cdef int L = x.shape(1)
    cdef na.array am = x         # placeholder; replaced by _step_mask
    cdef const na.array* mp = NULL
    cache.update(qkvo[1], qkvo[2], mask != NULL or L > 1)    # (as Attention.core passes it)
    try:
        if mask != NULL and _step_mask(a, cache, L, offset, mask, qkvo[0].dtype(), &am):
            mp = &am
        out[0] = block_attn_mlp_run(
            qkvo[0], cache.out_k[0], cache.out_v[0], x, a.scale, o, n_o,
            blk.post_attn_norm.eps, n_mid.weight[0], n_mid.eps, gu, dn, n_mlp,
            blk.post_ff_norm.eps if sandwich else 0.0, 1 if m.gelu else 0, mp)
    finally:
        cache.drop_outputs()
    return True


cdef bint _step_mask(Attention a, LayerCache cache, int L, int offset, const na.array* mask,
                     na.Dtype dt, na.array* out) except -1:
    """The mask that Attention.core and attend build for a step over the
    cache's ordered views (after cache.update): the caller's (a batch's
    padding), with the causal rule for several positions and the layer's or
    cache's sliding window once the step passes it."""
    cdef int window = _cache_window(a.window, cache), kstart = cache.out_start
    cdef cbool causal_mode = False
    return nnn.build_mask(_mask_kind(window, L, offset, kstart), L, offset,
                          cache.out_k[0].shape(2), kstart, window, mask, dt, False,
                          &causal_mode, out)


cdef bint cpu_block_step(Block blk, const na.array& x, LayerCache cache, const na.array* mask,
                         const na.array* offsets, bint sandwich, na.array** out) except -1:
    """Block.forward's fast path for CPU steps of one new position per row,
    or of up to kStepPositions (16) per row over a KVCache without a window
    (verification of a speculative step: k + 1 at the engine's default k = 8,
    with room; longer inputs, prompts, take the op path), by mlxcy.cpu_kernels'
    block primitives.  A padded batch's rows (padding mask, per-row offsets)
    take it too."""
    cdef int L = x.shape(1)
    if cache is None:
        return False
    if L != 1 and (L > kStepPositions or type(cache) is not KVCache
                   or blk.attn.window != 0 or cache.window > 0 or blk.attn.rope.dyn_factor > 0):
        return False
    if type(cache) is not KVCache and type(cache) is not RotatingKVCache:
        return False
    if not use_block_kernels():
        return False
    return _cpu_block_step(blk, x, cache, mask, offsets, sandwich, out)


cdef bint _cpu_sync(Model m) except -1:
    """CPU inference with quantized layers: evaluate as it goes (cpu_sync).
    Not when mlxcy.cpu_kernels runs them: its products read the packed weights
    directly (no dequantized temporaries to bound), and each sync is a wait on
    MLX's CPU thread."""
    if not _tuning.cpu_sync or na.default_device().type != na.cpu or not m.layers:
        return False
    if _cpu_kernels.enabled() is not False and (<Block>m.layers[0]).attn.o_proj.bits in (4, 8):
        return False
    return m.embed.quantized or (<Block>m.layers[0]).attn.o_proj.quantized


cdef na.array* _head_in_blocks(Model m, const na.array& h) except NULL:
    """m.head(h) with a quantized head's blocks evaluated one by one."""
    cdef bint old = set_eval_blocks(True)
    try:
        return m.head(h)
    finally:
        set_eval_blocks(old)


cdef object _copy(na.array* p):
    return None if p == NULL else wrap(new na.array(p[0]))


def fuse_linears(list parts):
    """One Linear whose output is the parts' outputs side by side, or None
    when they cannot share one matmul (mixed quantization or biases)."""
    from mlxcy import ops
    cdef Linear l, first = parts[0]
    for l in parts:
        if (l.quantized != first.quantized or l.bits != first.bits
                or l.group_size != first.group_size or (l.bias == NULL) != (first.bias == NULL)
                or (l.qbiases == NULL) != (first.qbiases == NULL)
                or l.in_features != first.in_features):
            return None
    cat = lambda ptrs: None if ptrs[0] is None else ops.concatenate(ptrs, axis=0)
    w = cat([_copy((<Linear>l).weight) for l in parts])
    b = cat([_copy((<Linear>l).bias) for l in parts])
    if not first.quantized:
        return Linear(w, b)
    return Linear(w, b, cat([_copy((<Linear>l).scales) for l in parts]),
                  cat([_copy((<Linear>l).qbiases) for l in parts]), first.group_size, first.bits)


# --------------------------------------------------------------- weights ---

class Weights:
    """Hugging Face-named weights with MLX's quantized layout: hands out
    validated layers and names the tensor in every error."""

    def __init__(self, weights, quantization=None, dtype=None, spec=None):
        if not isinstance(weights, dict):
            raise TypeError(f"weights must be a dict of name -> Array, got {type(weights).__name__}")
        rename = spec.rename if spec is not None else (lambda name: name)
        self.w = {}
        for name, a in weights.items():
            new = rename(name)
            if new is not None:
                self.w[new] = a
        q = quantization
        if q is not None:
            if not isinstance(q, dict):
                raise TypeError("quantization must be a dict like {'group_size': 64, 'bits': 4}")
            q = {rename(k) or k: val for k, val in q.items()}
        self.q = q
        self.dtype = None if dtype is None else _core.dtype(dtype)
        if self.dtype is not None and not self.dtype.is_floating:
            raise ValueError(f"dtype must be a floating type, got {self.dtype}")

    def has(self, name):
        return name in self.w

    def get(self, name, shape=None, floating=True):
        a = self.w.get(name)
        if a is None:
            raise ValueError(f"weights: missing tensor {name!r}")
        if not isinstance(a, _Array):
            try:
                a = to_array(a)
            except Exception as e:
                raise TypeError(f"weights: tensor {name!r} is not an array ({e})") from None
        if a.freed:
            raise ValueError(f"weights: tensor {name!r} has been freed")
        if shape is not None and tuple(a.shape) != tuple(shape):
            raise ValueError(f"weights: tensor {name!r} has shape {tuple(a.shape)}, "
                             f"expected {tuple(shape)}")
        if floating:
            if not a.dtype.is_floating:
                raise ValueError(f"weights: tensor {name!r} has dtype {a.dtype}, expected a float")
            if self.dtype is not None and a.dtype != self.dtype:
                a = a.astype(self.dtype)
        a.eval()
        return a

    def qspec(self, path):
        """(group_size, bits) when `path` is stored quantized, else None."""
        if path + ".scales" not in self.w:
            if self.q is not None and isinstance(self.q.get(path), dict):
                raise ValueError(f"weights: missing tensor {path + '.scales'!r} "
                                 f"(quantization lists {path!r})")
            return None
        if self.q is None:
            raise ValueError(f"weights: {path + '.scales'!r} is present (quantized) but no "
                             "quantization config was given")
        spec = self.q.get(path, self.q)
        if spec is False:
            raise ValueError(f"weights: {path!r} is marked unquantized but has scales")
        if not isinstance(spec, dict):
            spec = self.q
        try:
            gs, bits = int(spec.get("group_size", self.q.get("group_size"))), \
                int(spec.get("bits", self.q.get("bits")))
        except (TypeError, ValueError):
            raise ValueError(f"quantization: need integer group_size and bits for {path!r}") from None
        mode = spec.get("mode", self.q.get("mode", "affine"))
        if mode != "affine":
            raise ValueError(f"quantization: mode {mode!r} of {path!r} is not supported")
        if bits not in (2, 3, 4, 5, 6, 8):
            raise ValueError(f"quantization: unsupported bits {bits} for {path!r}")
        return gs, bits

    def _qtriplet(self, path, rows, cols, gs, bits):
        if cols % gs:
            raise ValueError(f"weights: {path!r} has {cols} columns, not a multiple of "
                             f"group_size {gs}")
        w = self.get(path + ".weight", (rows, cols * bits // 32), floating=False)
        if w.dtype != _core.uint32:
            raise ValueError(f"weights: quantized tensor {path + '.weight'!r} must be uint32, "
                             f"got {w.dtype}")
        s = self.get(path + ".scales", (rows, cols // gs))
        b = self.get(path + ".biases", (rows, cols // gs)) if self.has(path + ".biases") else None
        return w, s, b

    def linear(self, path, int in_f, int out_f, bias=False):
        qs = self.qspec(path)
        bb = self.get(path + ".bias", (out_f,)) if bias else None
        if qs is None:
            return Linear(self.get(path + ".weight", (out_f, in_f)), bb)
        gs, bits = qs
        w, s, b = self._qtriplet(path, out_f, in_f, gs, bits)
        return Linear(w, bb, s, b, gs, bits)

    def embedding(self, path, int vocab, int dims):
        qs = self.qspec(path)
        if qs is None:
            return Embedding(self.get(path + ".weight", (vocab, dims)))
        gs, bits = qs
        w, s, b = self._qtriplet(path, vocab, dims, gs, bits)
        return Embedding(w, s, b, gs, bits)

    def norm(self, path, int dims, float eps, float offset=0.0):
        return RMSNorm(self.get(path + ".weight", (dims,)), eps, offset)

    def module(self, m, float eps=0.0):
        """The layer a spec Module (mlxcy/models/spec.py) describes."""
        if m.kind == "linear":
            return self.linear(m.path, m.shape[1], m.shape[0], m.bias)
        if m.kind == "embedding":
            return self.embedding(m.path, m.shape[0], m.shape[1])
        return self.norm(m.path, m.shape[0], eps, m.offset)


def make_rope(cfg, theta, scaling):
    return Rope(cfg.head_dim, theta, scaling, cfg.max_position_embeddings)


def build_attention(W, cfg, dict m, scale=None, window=0, softcap=0.0, rope=None):
    """The attention of a layer from its spec modules `m` (q/k/v/o_proj and,
    when the family has them, q_norm/k_norm)."""
    H, Hkv, D = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    eps = cfg.rms_norm_eps
    qn = W.module(m["q_norm"], eps) if "q_norm" in m else None
    kn = W.module(m["k_norm"], eps) if "k_norm" in m else None
    return Attention(
        W.module(m["q_proj"]), W.module(m["k_proj"]), W.module(m["v_proj"]),
        W.module(m["o_proj"]),
        rope if rope is not None else make_rope(cfg, cfg.rope_theta, cfg.rope_scaling),
        H, Hkv, D, D ** -0.5 if scale is None else scale, qn, kn, window, softcap)


def build_mlp(W, dict m, gelu=False):
    return MLP(W.module(m["gate_proj"]), W.module(m["up_proj"]), W.module(m["down_proj"]), gelu)


# ----------------------------------------------------------------- model ---

cdef Array _ids_array(object ids, int vocab):
    if isinstance(ids, _Array):
        if (<Array>ids).freed:
            raise ValueError("ids: this array has been freed")
        npids = ids.numpy()
    else:
        npids = np.asarray(ids)
    if npids.dtype.kind not in "iu":
        if npids.size == 0 and npids.dtype.kind == "f":
            npids = npids.astype(np.int32)
        else:
            raise TypeError(f"ids must be integers, got dtype {npids.dtype}")
    if npids.ndim == 1:
        npids = npids[None, :]
    if npids.ndim != 2:
        raise ValueError(f"ids must have shape [B, L] or [L], got {npids.shape}")
    if npids.shape[0] == 0 or npids.shape[1] == 0:
        raise ValueError(f"ids must not be empty, got shape {npids.shape}")
    lo, hi = int(npids.min()), int(npids.max())
    if lo < 0 or hi >= vocab:
        raise ValueError(f"ids: token id {lo if lo < 0 else hi} is outside the vocabulary "
                         f"[0, {vocab})")
    return to_array(npids.astype(np.int32))


# ------------------------------------------------- the one-kernel GPU step ---
# On a CUDA GPU a one-token step of one sequence over KV caches runs as a
# single kernel launch (include/mlxcy/gpu_step.h) when the model is a plain
# pre-norm decoder (Llama/Mistral without a sliding window, Qwen2, Qwen3) or
# Gemma 3 (its sliding layers' rings growing or full) in
# bfloat16/float16/float32 or MLX's 4/8-bit layout; anything else takes the
# op-by-op path below.  set_gpu_decode_step(False) turns it off (A/B runs).

cdef extern from "<pthread.h>" nogil:
    unsigned long pthread_self()

cdef bint _gpu_step_on = True
cdef bint _gpu_verify_on = True
cdef bint _gpu_rows_on = True
cdef long long _gpu_steps = 0
# The thread that runs every one-kernel step of the process (the first to run
# one): the kernel's blocks wait for each other at barriers, so two of these
# kernels must never run at once -- on one thread gpu_step.h chains them; from
# two threads' streams they could, and could deadlock.  Other threads take the
# op path.
cdef unsigned long _gpu_step_thread = 0


def set_gpu_decode_step(bint on):
    """Use the one-kernel decode step on CUDA GPUs where it applies (default
    True); returns the previous setting."""
    global _gpu_step_on
    old = _gpu_step_on
    _gpu_step_on = on
    return old


def set_gpu_verify_step(bint on):
    """Run steps of several positions of one sequence (a speculative step's
    proposals, up to gpu_step.h's step_max_positions) as one kernel too, where
    the one-kernel step applies (default True); returns the previous setting."""
    global _gpu_verify_on
    old = _gpu_verify_on
    _gpu_verify_on = on
    return old


def set_gpu_rows_step(bint on):
    """Run a batch's one-token steps (one new token in each of its rows,
    left-padded or not) as the one-kernel step too, where it applies
    (default True); returns the previous setting."""
    global _gpu_rows_on
    old = _gpu_rows_on
    _gpu_rows_on = on
    return old


def set_gpu_launch_rows(int rows):
    """At most `rows` rows of a batch in one launch of the one-kernel step (0,
    the default: as many as shared memory takes, up to 64); a larger batch
    runs as several launches.  For tests and measurements; returns the
    previous setting."""
    if rows < 0:
        raise ValueError(f"rows must be >= 0, got {rows}")
    cdef int old = ngs.step_launch_rows()
    (&ngs.step_launch_rows())[0] = rows
    return old


def set_gpu_step_split(mode):
    """How the one-token kernel runs a layer's MLP: None (default) split over
    slices of its hidden rows, one grid-wide barrier fewer, where there are
    enough slices to keep the GPU busy; True wherever the slices are whole;
    False never; 2, 4 or 8: slices of that many 16-byte chunks of each down
    row wherever they are whole (tests; by default the kernel chooses).
    Returns the previous setting."""
    cdef int old = ngs.step_split_mode()
    if mode is not None and not isinstance(mode, bool) and mode not in (2, 4, 8):
        raise TypeError(f"mode must be None, True, False, 2, 4 or 8, got {mode!r}")
    (&ngs.step_split_mode())[0] = -1 if mode is None else int(mode)
    return None if old < 0 else bool(old) if old < 2 else old


def gpu_step_slice(Model m, int blocks):
    """The one-token kernel's MLP split for m on a grid of `blocks` (one per
    SM), as the setting above chooses it: 0 (not split) or the 16-byte chunks
    of each down row a slice takes; None where the kernel would not run m.
    Host arithmetic only, on any device (tests)."""
    if _gpu_step_of(m) is False:
        return None
    return ngs.step_slice((<_GpuStep>m.gpu_step).cfg, blocks)


def gpu_verify_positions(Model m):
    """The most positions of one sequence the one-kernel step verifies at
    once for m on this device (gpu_step.h's step_max_positions), or 0 where
    that kernel does not run m (another device, another layer form, or the
    several-positions form switched off): the engine keeps its proposals
    within it, since a longer verification runs op by op."""
    if not (_gpu_step_on and _gpu_verify_on and ngs.cuda_default_device()):
        return 0
    if _gpu_step_of(m) is False:
        return 0
    return ngs.step_max_positions((<_GpuStep>m.gpu_step).cfg)


def gpu_rows_kernel(Model m):
    """Whether a batch's one-token steps run as the one-kernel step for m on
    this device (its rows form: set_gpu_rows_step on, a CUDA device, a model
    the kernel runs).  The engine then proposes nothing for a batch's rows:
    their verification (several positions a row) would run op by op, slower
    than the kernel's plain steps."""
    if not (_gpu_step_on and _gpu_rows_on and ngs.cuda_default_device()):
        return False
    return _gpu_step_of(m) is not False


def step_table_per_layer():
    """Entries per layer in the one-kernel step's pointer table (gpu_step.h)."""
    return ngs.kStepPerLayer


def gpu_decode_steps():
    """How many decode steps have run as the one-kernel GPU step (tests and
    benchmarks check that the path was taken)."""
    return _gpu_steps


def gpu_step_timing(Model m):
    """The clock readings of m's last one-kernel decode step (numpy uint32,
    [2 + 3 * barriers, blocks]: each block's start, arrival at and release
    from every barrier, and end, then one reading inside each phase;
    gpu_step.h's clock_mark), or None.  Recorded only when
    MLXCY_STEP_TIMING=1 was in the environment at the first step
    (benchmarks/gpu_step_profile.py --phases)."""
    if not isinstance(m.gpu_step, _GpuStep):
        return None
    cdef _GpuStep p = <_GpuStep>m.gpu_step
    if p.st.timing.ndim() != 2:
        return None
    return np.asarray(wrap(new na.array(p.st.timing)))


cdef class _GpuStep:
    """What the kernel needs of a model besides its weights: its shapes and
    its device state (gpu_step.h's StepState: rotary frequencies, barrier
    counters, position, pointer table)."""
    cdef ngs.StepConfig cfg
    cdef ngs.StepState st
    cdef object inv_freq             # the rotary table it was given (numpy, a row per layer)

    def __cinit__(self):
        self.cfg = ngs.StepConfig()     # (cpp_locals: C++ members start unset)
        self.st = ngs.StepState()


cdef bint _plain(Linear l) noexcept:
    return l is not None and type(l) is Linear and l.weight != NULL and l.lora_a == NULL


cdef object _gpu_step_of(Model m):
    """m.gpu_step, planned on first use: a _GpuStep, or False."""
    if m.gpu_step is None:
        m.gpu_step = _plan_gpu_step(m)
    return m.gpu_step


cdef object _plan_gpu_step(Model m):
    """A _GpuStep for m, or False when its layers are not what the kernel runs."""
    form = m.step_form()
    if form is None or not m.layers:
        return False
    cdef bint gemma = form[0]
    cdef Block b0 = <Block>m.layers[0]
    cdef Attention a0 = b0.attn
    cdef _GpuStep p = _GpuStep()
    cdef Linear probe = a0.o_proj
    p.cfg.dtype = na.dtype_from_code(m.dtype_code)
    p.cfg.bits = probe.bits if probe is not None and probe.quantized else 0
    p.cfg.group_size = probe.group_size if p.cfg.bits else 0
    # the embedding (and the head: tied, or untied in the same format) may have
    # its own bits (a GGUF's Q8_0 embedding beside Q4 layers)
    p.cfg.ebits = m.embed.bits if m.embed is not None and m.embed.quantized else 0
    p.cfg.egs = m.embed.group_size if p.cfg.ebits else 0
    p.cfg.D = m.config.hidden_size
    p.cfg.NQ, p.cfg.NKV, p.cfg.HD = a0.n_heads, a0.n_kv_heads, a0.head_dim
    p.cfg.FF = b0.mlp.down_proj.in_features if b0.mlp.down_proj is not None else 0
    p.cfg.V = m.config.vocab_size
    p.cfg.L = len(m.layers)
    p.cfg.scale = a0.scale
    p.cfg.eps = b0.input_norm.eps
    p.cfg.qk_norm = a0.q_norm is not None
    p.cfg.qk_eps = a0.q_norm.eps if a0.q_norm is not None else 1e-6
    cdef Linear first = a0.qkv_proj if a0.qkv_proj is not None else a0.q_proj
    p.cfg.qkv_bias = first is not None and first.bias != NULL
    p.cfg.gemma = gemma
    p.cfg.embed_scale = _in_dtype(form[1], p.cfg.dtype) if form[1] else 0.0
    if ngs.step_config_problem(p.cfg).size() != 0:
        return False
    if not _embed_fits(m.embed, p) or (m.lm_head is not None and
                                       not _fits(m.lm_head, p, p.cfg.D, p.cfg.V, True)):
        return False
    cdef Block b
    cdef Attention a
    for blk in m.layers:
        if type(blk) is not Block and not gemma:
            return False
        b = <Block>blk
        a = b.attn
        # Gemma: its sandwich norms and GELU in every block (step_form checked
        # the blocks' type); its sliding windows are checked per step
        if (a.softcap > 0 or (a.window != 0 and not gemma) or b.mlp.gelu != gemma
                or (b.pre_ff_norm is None) == gemma or (b.post_ff_norm is None) == gemma
                or a.rope.dyn_factor > 0
                or a.rope.dims != a.head_dim or a.n_heads != p.cfg.NQ
                or a.n_kv_heads != p.cfg.NKV or a.head_dim != p.cfg.HD or a.scale != p.cfg.scale
                or (a.q_norm is not None) != p.cfg.qk_norm
                or b.input_norm.eps != p.cfg.eps or b.post_attn_norm.eps != p.cfg.eps
                or (gemma and (b.pre_ff_norm.eps != p.cfg.eps
                               or b.post_ff_norm.eps != p.cfg.eps))):
            return False
    if m.norm.eps != p.cfg.eps:
        return False
    # RoPE, a row per layer (Gemma's sliding layers have their own base):
    # theta_i = pos * inv_freq[i], scale folded in (as Rope.apply's MLX call)
    inv = np.stack([_inv_freq((<Block>blk).attn.rope, p.cfg.HD // 2) for blk in m.layers])
    if not gemma and (inv != inv[0]).any():
        return False           # (the kernel reads one row but for Gemma)
    p.inv_freq = inv.astype(np.float32)
    cdef Array fa = to_array(p.inv_freq)     # (held: handle() borrows)
    ngs.step_init(p.st, handle(fa)[0])
    return p


cdef float _in_dtype(double v, na.Dtype dt):
    """v rounded to dt, as nnn.scalar(v, dt) holds it."""
    cdef Array a = wrap(heap(nnn.astype(nnn.scalar(v, dt), na.float32)))
    return float(np.asarray(a))


cdef object _inv_freq(Rope r, int half):
    if r.freqs != NULL:
        return r.scale / np.asarray(wrap(new na.array(r.freqs[0])), dtype=np.float64)
    return r.scale * np.power(float(r.base), -np.arange(half, dtype=np.float64) * 2 / r.dims)


cdef bint _format_fits(_GpuStep p, bint quantized, int bits, int group_size,
                       const na.array* w, const na.array* scales,
                       const na.array* qbiases, int want_bits, int want_group) noexcept:
    """Are a layer's weights in the kernel's format: the model's dtype
    (want_bits 0), or MLX's affine layout at want_bits and want_group with
    scales and biases in the model's dtype?"""
    cdef int code = na.dtype_code(p.cfg.dtype)
    if want_bits == 0:
        return not quantized and na.dtype_code(w.dtype()) == code
    return (quantized and bits == want_bits and group_size == want_group
            and qbiases != NULL and na.dtype_code(scales.dtype()) == code
            and na.dtype_code(qbiases.dtype()) == code)


cdef bint _fits(Linear l, _GpuStep p, int k, int n, bint head=False) noexcept:
    """Is l an [n, k] layer of the kernel's weight format (head: the
    embedding's format, which may differ from the layers')?"""
    if not _plain(l) or l.in_features != k or l.out_features != n:
        return False
    if l.bias != NULL and na.dtype_code(l.bias.dtype()) != na.dtype_code(p.cfg.dtype):
        return False
    return _format_fits(p, l.quantized, l.bits, l.group_size, l.weight, l.scales, l.qbiases,
                        p.cfg.ebits if head else p.cfg.bits,
                        p.cfg.egs if head else p.cfg.group_size)


cdef bint _embed_fits(Embedding em, _GpuStep p) noexcept:
    """Is the embedding (also the head when tied) in the kernel's format?"""
    if em.weight == NULL or em.num_embeddings != p.cfg.V or em.dims != p.cfg.D:
        return False
    return _format_fits(p, em.quantized, em.bits, em.group_size, em.weight, em.scales,
                        em.qbiases, p.cfg.ebits, p.cfg.egs)


cdef bint _norm_fits(RMSNorm n, _GpuStep p, int dims) noexcept:
    return (n is not None and n.weight != NULL and n.dims == dims
            and na.dtype_code(n.weight.dtype()) == na.dtype_code(p.cfg.dtype))


cdef inline void _put(vector[ngs.StepPtr]& e, const na.array* a, int row0) noexcept:
    cdef ngs.StepPtr s = ngs.StepPtr()
    s.a = a
    s.row0 = row0
    e.push_back(s)


cdef inline void _put_value(vector[ngs.StepPtr]& e, long long v) noexcept:
    cdef ngs.StepPtr s = ngs.StepPtr()
    s.value = v
    e.push_back(s)


cdef void _put_linear(vector[ngs.StepPtr]& e, Linear l, int row0) noexcept:
    _put(e, l.weight, row0)
    _put(e, l.scales if l.quantized else NULL, row0)
    _put(e, l.qbiases if l.quantized else NULL, row0)


cdef bint _layer_entries(vector[ngs.StepPtr]& e, Block b, _GpuStep p) noexcept:
    """Append the 30 weight entries of block b (gpu_step.h's layout; the
    layer's 3 cache values follow them); False if a layer does not fit (LoRA
    attached, freed, another format)."""
    cdef Attention a = b.attn
    cdef MLP m = b.mlp
    cdef int D = p.cfg.D, nq = p.cfg.NQ * p.cfg.HD, nk = p.cfg.NKV * p.cfg.HD, FF = p.cfg.FF
    cdef int i
    cdef Linear l
    cdef int r0[3]
    r0[0], r0[1], r0[2] = 0, nq, nq + nk
    # the MLP's input norm (Gemma's pre_ff_norm), and Gemma's norms of o_proj's
    # and down's outputs
    cdef RMSNorm mlp_norm = b.pre_ff_norm if p.cfg.gemma else b.post_attn_norm
    if not _norm_fits(b.input_norm, p, D) or not _norm_fits(mlp_norm, p, D):
        return False
    if p.cfg.gemma and (not _norm_fits(b.post_attn_norm, p, D)
                        or not _norm_fits(b.post_ff_norm, p, D)):
        return False
    _put(e, b.input_norm.weight, 0)
    if a.qkv_proj is not None:
        l = a.qkv_proj
        if not _fits(l, p, D, nq + 2 * nk) or (l.bias != NULL) != p.cfg.qkv_bias:
            return False
        for i in range(3):
            _put_linear(e, l, r0[i])
        for i in range(3):
            _put(e, l.bias, r0[i])
    else:
        for l in (a.q_proj, a.k_proj, a.v_proj):
            if not _fits(l, p, D, nq if l is a.q_proj else nk) \
                    or (l.bias != NULL) != p.cfg.qkv_bias:
                return False
            _put_linear(e, l, 0)
        for l in (a.q_proj, a.k_proj, a.v_proj):
            _put(e, l.bias, 0)
    if p.cfg.qk_norm:
        if not _norm_fits(a.q_norm, p, p.cfg.HD) or not _norm_fits(a.k_norm, p, p.cfg.HD):
            return False
        _put(e, a.q_norm.weight, 0)
        _put(e, a.k_norm.weight, 0)
    else:
        _put(e, NULL, 0)
        _put(e, NULL, 0)
    if not _fits(a.o_proj, p, nq, D) or a.o_proj.bias != NULL:
        return False
    _put_linear(e, a.o_proj, 0)
    _put(e, mlp_norm.weight, 0)
    if m.gate_up_proj is not None:
        if not _fits(m.gate_up_proj, p, D, 2 * FF) or m.gate_up_proj.bias != NULL:
            return False
        _put_linear(e, m.gate_up_proj, 0)
        _put_linear(e, m.gate_up_proj, FF)
    else:
        if not _fits(m.gate_proj, p, D, FF) or not _fits(m.up_proj, p, D, FF) \
                or m.gate_proj.bias != NULL or m.up_proj.bias != NULL:
            return False
        _put_linear(e, m.gate_proj, 0)
        _put_linear(e, m.up_proj, 0)
    if not _fits(m.down_proj, p, FF, D) or m.down_proj.bias != NULL:
        return False
    _put_linear(e, m.down_proj, 0)
    _put(e, b.post_attn_norm.weight if p.cfg.gemma else NULL, 0)
    _put(e, b.post_ff_norm.weight if p.cfg.gemma else NULL, 0)
    return True


cdef bint gpu_step(Model m, const na.array& ids, Cache cache, const na.array* mask,
                   const na.array* offsets, na.array** out) except -1:
    """The one-kernel step for [1, M] tokens (M = 1, or up to the kernel's
    limit for several positions), or one token for each row of an unpadded
    batch ([B, 1]), over plain KV caches with room for them; False (nothing
    done) when it does not apply."""
    if mask != NULL or offsets != NULL:
        return False
    if ids.ndim() == 2 and ids.shape(0) > 1:
        return gpu_rows_step(m, ids, cache, NULL, out)
    if ids.ndim() != 2 or (ids.shape(1) > 1 and not _gpu_verify_on):
        return False
    return _gpu_launch(m, ids, cache, NULL, out)


cdef bint gpu_rows_step(Model m, const na.array& ids, Cache cache, const na.array* rpos,
                        na.array** out) except -1:
    """The one-kernel step for one new token in each row of a batch (ids [B,
    1], 1 < B <= gpu_step.h's step_max_batch) over batched KV
    caches: rpos (int32 [B]) is each row's rotary position, the cache offset
    less its left padding, whose slots the row does not attend to (NULL: no
    row is padded); logits [B, 1, V], or False (nothing done) when the kernel
    does not apply."""
    if (not _gpu_rows_on or ids.ndim() != 2 or ids.shape(0) < 2 or ids.shape(1) != 1
            or (rpos != NULL and (rpos.ndim() != 1 or rpos.shape(0) != ids.shape(0)
                                  or na.dtype_code(rpos.dtype()) != na.dtype_code(na.int32)))):
        return False
    return _gpu_launch(m, ids, cache, rpos, out)


cdef bint _gpu_launch(Model m, const na.array& ids, Cache cache, const na.array* rpos,
                      na.array** out) except -1:
    """gpu_step's and gpu_rows_step's launch, once their form is checked."""
    global _gpu_steps, _gpu_step_thread
    if (not _gpu_step_on or cache is None or ids.shape(1) < 1
            or na.dtype_code(ids.dtype()) != na.dtype_code(na.int32)
            or not ngs.cuda_default_device()):
        return False
    if _gpu_step_thread != 0 and _gpu_step_thread != pthread_self():
        return False
    cdef int B = ids.shape(0), M = ids.shape(1), off = -1
    cdef vector[ngs.StepPtr] e = vector[ngs.StepPtr]()
    cdef vector[na.array] ks = vector[na.array](), vs = vector[na.array]()
    if not _step_inputs(m, cache, M, e, ks, vs, &off, B):
        return False
    _gpu_step_thread = pthread_self()
    cdef _GpuStep p = <_GpuStep>m.gpu_step
    cdef na.array* rp = NULL
    try:
        if B > 1:          # (an unpadded batch: every row at the cache offset)
            rp = heap(nops.full(shape1(B), na.array(<int64_t>off, na.int32), na.int32)) \
                if rpos == NULL else new na.array(rpos[0])
        out[0] = heap(ngs.step_decode(p.cfg, e, p.st, ids, ks, vs, off, rp))
    finally:
        if rp != NULL:
            del rp
    cdef int i = 0
    cdef LayerCache lc
    cdef RotatingKVCache rc
    for c in cache.layers:      # the buffers, now depending on the kernel that writes them
        lc = <LayerCache>c
        lc.keys[0] = ks[i]
        lc.values[0] = vs[i]
        lc.offset = off + M
        if type(c) is RotatingKVCache:    # (one position, at slot idx: _step_cache)
            rc = <RotatingKVCache>c
            rc.filled = min(rc.filled + M, rc.window)
            rc.idx = (rc.idx + M) % rc.window
        i += 1
    _gpu_steps += 1
    return True


cdef bint _step_inputs(Model m, Cache cache, int M, vector[ngs.StepPtr]& e,
                       vector[na.array]& ks, vector[na.array]& vs, int* off, int B=1) except -1:
    """What a step of M positions over cache (of B rows: then one position
    each) gives the kernel: the pointer table's entries, every layer's key
    and value buffers and the position; False when the kernel does not run
    the model or these caches (m.gpu_step: the plan, made on the first
    call)."""
    if _gpu_step_of(m) is False:
        return False
    cdef _GpuStep p = <_GpuStep>m.gpu_step
    # (a batch of more rows than one launch takes runs in several launches on
    # the tensor cores, else op by op: two launches of 16 rows on CUDA-core
    # products were slower than MLX's ops, 2026-12-06 -- docs/benchmarks.md)
    if M > ngs.step_max_positions(p.cfg) or (B > 1 and (M != 1 or B > ngs.step_max_batch(p.cfg))):
        return False
    cdef LayerCache lc
    cdef int cap = -1, rot
    cdef vector[int] rots = vector[int](), windows = vector[int]()
    if len(cache.layers) != len(m.layers):
        return False
    for c, blk in zip(cache.layers, m.layers):
        rot = _step_cache(c, (<Block>blk).attn.window, p, m.dtype_code, M, B)
        if rot < 0:
            return False
        rots.push_back(rot)
        windows.push_back((<LayerCache>c).window)     # (0 for a KVCache)
        lc = <LayerCache>c
        if off[0] < 0:
            off[0], cap = lc.offset, lc.keys.shape(2)
        # every layer at one position; one capacity but for Gemma's (the
        # kernel reads each layer's)
        if lc.offset != off[0] or (lc.keys.shape(2) != cap and not p.cfg.gemma):
            return False
        ks.push_back(lc.keys[0])
        vs.push_back(lc.values[0])
    cdef int i = 0
    for b in m.layers:
        if not _layer_entries(e, <Block>b, p):
            return False
        _put_value(e, 0)              # the capacity: step_decode's, from the buffers
        _put_value(e, windows[i])     # a ring's window and rotation (gpu_step.h, attention)
        _put_value(e, rots[i])
        i += 1
    if not _embed_fits(m.embed, p) or not _norm_fits(m.norm, p, p.cfg.D):
        return False
    _put(e, m.embed.weight, 0)
    _put(e, m.embed.scales if m.embed.quantized else NULL, 0)
    _put(e, m.embed.qbiases if m.embed.quantized else NULL, 0)
    _put(e, m.norm.weight, 0)
    if m.lm_head is not None:
        if not _fits(m.lm_head, p, p.cfg.D, p.cfg.V, True) or m.lm_head.bias != NULL:
            return False
        _put_linear(e, m.lm_head, 0)
    else:
        _put(e, m.embed.weight, 0)
        _put(e, m.embed.scales if m.embed.quantized else NULL, 0)
        _put(e, m.embed.qbiases if m.embed.quantized else NULL, 0)
    return True


def gpu_step_plan(Model m, Cache cache, int positions=1, int rows=1):
    """What the one-kernel GPU step would be given for a step of `positions`
    tokens over cache (or of one token in each of a batch's `rows` rows), on
    any device (tests): None where it would not run,
    else a dict -- gemma, embed_scale (in the model's dtype), inv_freq (a
    row per layer), entries (the pointer table's length), offset and caps
    (each layer's cache capacity), windows and rotations (each sliding
    layer's ring: slot (p - rotation) mod window holds position p; 0 for the
    others); table (each entry's (Array or None, row0, value)), keys and
    values (each layer's buffers) and config (the StepConfig's shapes and
    constants): what tools/emulate_gpu_step.py runs the kernel's code on."""
    cdef int off = -1
    cdef vector[ngs.StepPtr] e = vector[ngs.StepPtr]()
    cdef vector[na.array] ks = vector[na.array](), vs = vector[na.array]()
    if not _step_inputs(m, cache, positions, e, ks, vs, &off, rows):
        return None
    cdef _GpuStep p = <_GpuStep>m.gpu_step
    cdef int P = ngs.kStepPerLayer
    cdef size_t j
    table = [(wrap(new na.array(e[j].a[0])) if e[j].a != NULL else None, e[j].row0, e[j].value)
             for j in range(e.size())]
    return dict(gemma=p.cfg.gemma, embed_scale=p.cfg.embed_scale, inv_freq=p.inv_freq,
                entries=e.size(), offset=off, caps=[ks[i].shape(2) for i in range(ks.size())],
                windows=[e[(i + 1) * P - 2].value for i in range(ks.size())],
                rotations=[e[(i + 1) * P - 1].value for i in range(ks.size())], table=table,
                keys=[wrap(new na.array(ks[i])) for i in range(ks.size())],
                values=[wrap(new na.array(vs[i])) for i in range(vs.size())],
                config=dict(D=p.cfg.D, NQ=p.cfg.NQ, NKV=p.cfg.NKV, HD=p.cfg.HD, FF=p.cfg.FF,
                            V=p.cfg.V, L=p.cfg.L, bits=p.cfg.bits, group_size=p.cfg.group_size,
                            ebits=p.cfg.ebits, egs=p.cfg.egs, qkv_bias=p.cfg.qkv_bias,
                            qk_norm=p.cfg.qk_norm, eps=p.cfg.eps, qk_eps=p.cfg.qk_eps,
                            scale=p.cfg.scale))


cdef int _step_cache(c, int window, _GpuStep p, int dtype_code, int M, int B) noexcept:
    """Can the kernel write M positions into layer cache c and attend over it:
    -1 if not, else the rotation of its ring (0 for a KVCache).  A KVCache
    (for a layer with a sliding window, every position inside it: no mask),
    or (Gemma) a RotatingKVCache that holds every position from 0 in slot =
    position with room for M more (of each of B rows), or, for one position
    of one sequence, a full one: the kernel then writes the new key over the
    oldest (slot idx), and slot s holds position p where s = (p - rotation)
    mod window."""
    cdef LayerCache lc = <LayerCache>c
    cdef RotatingKVCache rc
    cdef int rot = 0
    if type(c) is RotatingKVCache:
        rc = <RotatingKVCache>c
        if not p.cfg.gemma:
            return -1
        if rc.filled == rc.window and M == 1 and B == 1:
            rot = (lc.offset - rc.idx) % rc.window
        elif rc.filled != lc.offset or rc.idx != lc.offset or lc.offset + M > rc.window:
            return -1
        if lc.keys == NULL or min(lc.offset + M, rc.window) > lc.keys.shape(2):
            return -1
    elif type(c) is not KVCache or (window > 0 and lc.offset + M > window) \
            or lc.keys == NULL or lc.offset + M > lc.keys.shape(2):
        return -1
    if (lc.keys.ndim() == 4 and lc.keys.shape(0) == B
            and lc.keys.shape(1) == p.cfg.NKV and lc.keys.shape(3) == p.cfg.HD
            and lc.values.shape(2) == lc.keys.shape(2)
            and na.dtype_code(lc.keys.dtype()) == dtype_code
            and na.dtype_code(lc.values.dtype()) == dtype_code):
        return rot
    return -1


cdef class Model:
    """A decoder-only language model over native MLX arrays.

    model(ids, cache=None, mask=None, offsets=None, last_only=False) -> logits
    Array [B, L, vocab] (L = 1 with last_only).  Use make_cache() for
    incremental decoding; close() (or a `with` block) frees every weight.
    The ids are checked against the vocabulary on the host, so ids given as
    an Array are read back first, which waits for them to be computed: a
    decode loop that keeps each token on the device should run on
    mlxcy.generation (Engine, generate_ids), which does not wait.
    """
    def __init__(self, config, weights, quantization=None, dtype=None):
        from mlxcy.models.config import ModelConfig
        cfg = ModelConfig.from_dict(config) if isinstance(config, dict) else config
        if not isinstance(cfg, ModelConfig):
            raise TypeError("config must be a ModelConfig or a config.json dict")
        spec = cfg.spec
        if spec.model_class.rpartition(":")[2] != type(self).__name__:
            raise ValueError(f"{type(self).__name__} cannot build model_type {cfg.model_type!r} "
                             f"(its forward is {spec.model_class})")
        self.config = cfg
        self.quant = quantization
        W = Weights(weights, quantization, dtype, spec)
        self.layers = []
        top = spec.top_modules(cfg)
        try:
            self.embed = W.module(top["embed_tokens"])
            self.dtype_code = self.embed.dtype_code()
            for i in range(cfg.num_hidden_layers):
                self.layers.append(self.build_block(W, cfg, i))
            self.norm = W.module(top["norm"], cfg.rms_norm_eps)
            if "lm_head" in top:
                self.lm_head = W.module(top["lm_head"])
        except BaseException:
            self.close()
            raise

    def step_form(self):
        """What the one-kernel GPU step must know of this class's forward:
        (gemma, the embedding's factor), or None when the kernel does not run
        it (a subclass that changes the forward says so by overriding this)."""
        return (False, 0.0) if type(self) is Model else None

    def build_block(self, W, cfg, int i):
        """Layer i: the pre-norm block with the modules the spec lists."""
        m = cfg.spec.layer_modules(cfg, i)
        eps = cfg.rms_norm_eps
        norms = [W.module(m[n], eps) for n in cfg.spec.block_norms]
        return Block(build_attention(W, cfg, m, window=cfg.window(i)), build_mlp(W, m), *norms)

    def fuse(self):
        """Fuse each block's q/k/v and gate/up weights into single matmuls (the
        same logits, fewer kernel launches per token).  Inference only: LoRA
        training wants the separate projections."""
        self._check_open()
        for b in self.layers:
            b.fuse()
        self.gpu_step = None
        return self

    # -- lifetime ---------------------------------------------------------------
    def close(self):
        """Free every weight now; later calls raise."""
        if isinstance(self.gpu_step, _GpuStep):
            # the one-kernel step reads the weights by address, not as MLX
            # inputs: run a step still queued and let it finish before they
            # are freed (a later step's kernel is chained after it)
            ngs.step_finish((<_GpuStep>self.gpu_step).st)
            self.gpu_step = None
        if self.embed is not None:
            self.embed.free()
        for b in self.layers or ():
            (<Block>b).free()
        if self.norm is not None:
            self.norm.free()
        if self.lm_head is not None:
            self.lm_head.free()
        self.layers = []
        self.is_closed = True

    @property
    def closed(self):
        return self.is_closed

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    cdef int _check_open(self) except -1:
        if self.is_closed:
            raise ValueError(f"{type(self).__name__}: the model has been closed")
        return 0

    # -- native forward -----------------------------------------------------------
    cdef na.array* embed_tokens(self, const na.array& ids) except NULL:
        return self.embed.lookup(ids)

    cdef na.array* head(self, const na.array& h) except NULL:
        """Final norm, then the output projection."""
        cdef na.array* n = self.norm.forward(h)
        try:
            return self.project(n[0])
        finally:
            del n

    cdef na.array* project(self, const na.array& n) except NULL:
        """The output projection (tied or not) of normalized hidden states."""
        if self.lm_head is not None:
            return self.lm_head.forward(n)
        return self.embed.as_linear(n)

    cdef na.array* forward(self, const na.array& ids, Cache cache, const na.array* mask,
                           const na.array* offsets, bint last_only) except NULL:
        self._check_open()
        cdef int n = len(self.layers), i
        cdef int L = ids.shape(1)
        cdef LayerCache lc = None
        cdef Block blk
        cdef na.array* nh
        if cache is not None and len(cache.layers) != n:
            raise ValueError(f"cache has {len(cache.layers)} layers, the model {n}")
        cdef na.array* out = NULL
        if (L == 1 or not last_only) and gpu_step(self, ids, cache, mask, offsets, &out):
            return out
        cdef bint sync = cache is not None and _cpu_sync(self)
        cdef na.array* h = self.embed_tokens(ids)
        try:
            for i in range(n):
                blk = <Block>self.layers[i]
                if cache is not None:
                    lc = <LayerCache>cache.layers[i]
                nh = blk.forward(h[0], lc, mask, offsets)
                del h
                h = nh
                if sync:
                    nnn.eval_now(h[0])
            if last_only and L > 1:
                nh = heap(nnn.take_position(h[0], L - 1))
                del h
                h = nh
            if sync:
                nh = _head_in_blocks(self, h[0])
            else:
                nh = self.head(h[0])
        finally:
            del h
        return nh

    # -- Python boundary ------------------------------------------------------------
    def __call__(self, ids, cache=None, mask=None, offsets=None, bint last_only=False):
        self._check_open()
        cdef Array a = _ids_array(ids, self.config.vocab_size)
        cdef Array m = None
        cdef Array o = None
        if cache is not None and not isinstance(cache, Cache):
            raise TypeError("cache must come from make_cache()")
        if mask is not None:
            m = mask if isinstance(mask, _Array) else to_array(np.asarray(mask))
            handle(m)
        if offsets is not None:
            o = to_array(offsets, _core.int32) if not isinstance(offsets, _Array) \
                else offsets.astype(_core.int32)
            if o.ndim == 0:
                o = o.reshape(1)
            if o.ndim != 1 or o.shape[0] not in (1, a.shape[0]):
                raise ValueError(f"offsets must have shape [B] = [{a.shape[0]}], got {o.shape}")
        cdef const na.array* mp = NULL
        cdef const na.array* op = NULL
        if m is not None:
            mp = handle(m)
        if o is not None:
            op = handle(o)
        return wrap(self.forward(handle(a)[0], cache, mp, op, last_only))

    def make_cache(self, max_size=None):
        """One cache per layer: rotating ones (the window) for sliding-window
        layers; with max_size, every layer keeps at most max_size positions."""
        self._check_open()
        caches = []
        for b in self.layers:
            w = (<Block>b).attn.window
            if max_size is not None:
                w = int(max_size) if w == 0 else min(w, int(max_size))
            caches.append(RotatingKVCache(w) if w > 0 else KVCache())
        return Cache(caches)

    # -- description ------------------------------------------------------------------
    def nparams(self):
        self._check_open()
        n = self.embed.nparams() + self.norm.nparams()
        n += sum(b.nparams() for b in self.layers)
        if self.lm_head is not None:
            n += self.lm_head.nparams()
        return n

    def nbytes(self):
        self._check_open()
        n = self.embed.nbytes() + self.norm.nbytes()
        n += sum(b.nbytes() for b in self.layers)
        if self.lm_head is not None:
            n += self.lm_head.nbytes()
        return n

    @property
    def dtype(self):
        return _core.dtype(_DTYPE_NAMES[self.dtype_code])

    def info(self):
        self._check_open()
        c = self.config
        q = None
        if self.quant:
            q = {"bits": self.quant.get("bits"), "group_size": self.quant.get("group_size")}
        return {
            "architecture": c.model_type,
            "family": c.family,
            "vocab_size": c.vocab_size,
            "layers": c.num_hidden_layers,
            "hidden_size": c.hidden_size,
            "heads": c.num_attention_heads,
            "kv_heads": c.num_key_value_heads,
            "head_dim": c.head_dim,
            "context_length": c.max_position_embeddings,
            "sliding_window": c.sliding_window if "sliding_attention" in c.layer_types else None,
            "tied_embeddings": self.lm_head is None,
            "dtype": self.dtype.name,
            "quantization": q,
            "parameters": self.nparams(),
            "bytes": self.nbytes(),
        }

    def __repr__(self):
        c = self.config
        state = "closed" if self.is_closed else f"{c.num_hidden_layers} layers, hidden {c.hidden_size}"
        return f"<{type(self).__name__} {c.model_type}: {state}>"


_DTYPE_NAMES = ("bool_", "uint8", "uint16", "uint32", "uint64", "int8", "int16", "int32",
                "int64", "float16", "float32", "float64", "bfloat16", "complex64")
