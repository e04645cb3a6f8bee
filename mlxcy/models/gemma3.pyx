# cython: language_level=3, cpp_locals=True
"""Gemma 3's forward (the family's spec: mlxcy/models/families/gemma3.py):
embeddings scaled by sqrt(hidden) in the weights' dtype, the sandwich block
(four norms), gelu-tanh MLP, attention scale query_pre_attn_scalar**-0.5,
sliding-window layers with their own RoPE base, optional attention-logit and
final-logit soft-capping."""
import math

import numpy as np

from mlxcy.native cimport array as na
from mlxcy.native cimport nn as nnn
from mlxcy.native.array cimport heap
from mlxcy.models.cache cimport LayerCache
from mlxcy.models.base cimport Model, Block, cpu_block_step
from mlxcy.models.base import Rope, build_attention, build_mlp


cdef class GemmaBlock(Block):
    """h = x + post_attn(attn(input(x))); out = h + post_ff(mlp(pre_ff(h)))"""

    cdef na.array* forward(self, const na.array& x, LayerCache cache, const na.array* mask,
                           const na.array* offsets) except NULL:
        cdef na.array* fused = NULL
        if cpu_block_step(self, x, cache, mask, offsets, True, &fused):
            return fused      # mlxcy.cpu_kernels: a one-token step in two primitives
        cdef na.array h = nnn.own(self.input_norm.forward(x))
        cdef na.array r = nnn.own(self.attn.forward(h, cache, mask, offsets))
        r = nnn.own(self.post_attn_norm.forward(r))
        h = nnn.add(x, r)
        r = nnn.own(self.pre_ff_norm.forward(h))
        r = nnn.own(self.mlp.forward(r))
        r = nnn.own(self.post_ff_norm.forward(r))
        return heap(nnn.add(h, r))


cdef class Gemma3Model(Model):
    """Gemma 3's forward; its tensors, config and GGUF names are declared in
    mlxcy/models/families/gemma3.py."""
    cdef double embed_scale
    cdef float final_softcap

    def __init__(self, config, weights, quantization=None, dtype=None):
        Model.__init__(self, config, weights, quantization, dtype)
        cfg = self.config
        # sqrt(hidden) as float32, then rounded to the weights' dtype in forward
        self.embed_scale = float(np.float32(math.sqrt(cfg.hidden_size)))
        self.final_softcap = cfg.final_logit_softcapping or 0.0

    def step_form(self):
        """The one-kernel GPU step runs Gemma 3 (base.pyx): the sandwich
        blocks, the embedding times sqrt(hidden) in the weights' dtype; not
        with final-logit soft-capping."""
        if type(self) is not Gemma3Model or self.final_softcap > 0 \
                or any(type(b) is not GemmaBlock for b in self.layers):
            return None
        return (True, self.embed_scale)

    def build_block(self, W, cfg, int i):
        """Sliding layers with the local RoPE base, the sandwich norms, gelu-tanh."""
        if cfg.window(i):
            rope = Rope(cfg.head_dim, cfg.rope_local_base_freq, cfg.local_rope_scaling,
                        cfg.max_position_embeddings)
        else:
            rope = Rope(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling,
                        cfg.max_position_embeddings)
        m = cfg.spec.layer_modules(cfg, i)
        eps = cfg.rms_norm_eps
        return GemmaBlock(
            build_attention(W, cfg, m, scale=cfg.query_pre_attn_scalar ** -0.5,
                            window=cfg.window(i), softcap=cfg.attn_logit_softcapping or 0.0,
                            rope=rope),
            build_mlp(W, m, gelu=True),
            *[W.module(m[n], eps) for n in cfg.spec.block_norms])

    cdef na.array* embed_tokens(self, const na.array& ids) except NULL:
        cdef na.array e = nnn.own(self.embed.lookup(ids))
        return heap(nnn.multiply(e, nnn.scalar(self.embed_scale, e.dtype())))

    cdef na.array* project(self, const na.array& n) except NULL:
        cdef na.array* logits = Model.project(self, n)
        cdef na.array out
        if self.final_softcap <= 0:
            return logits
        out = nnn.own(logits)
        return heap(nnn.softcap(out, self.final_softcap))
