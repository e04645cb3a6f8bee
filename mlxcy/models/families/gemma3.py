"""Gemma 3 (gemma3_text, and the language model of the multimodal gemma3):
embeddings scaled by sqrt(hidden), (1 + w) RMSNorms (q/k norms included),
four norms per block (sandwich), gelu-tanh MLP, attention scale
query_pre_attn_scalar**-0.5, sliding-window layers (5 of 6 by default) with
their own RoPE base, optional attention-logit and final-logit soft-capping.
The forward: mlxcy/models/gemma3.pyx.  GGUF files store the norms as (1 + w)
and leave out query_pre_attn_scalar, rope_local_base_freq and the layer
pattern (the values of the released sizes are filled in)."""
from mlxcy.models.spec import (ArchSpec, BASE_FIELDS, Field, GGUF_LAYER_NAMES, fields,
                               rope_scaling, rope_theta, _err)

_GELU = ("gelu_pytorch_tanh", "gelu_tanh", "gelu_approx")


class Gemma3Spec(ArchSpec):
    keeps_window = True

    def text_config(self, hf):
        if hf.get("model_type") != "gemma3":
            return hf
        tc = hf.get("text_config")
        if tc is None:
            tc = {}
        if not isinstance(tc, dict):
            raise _err("gemma3: 'text_config' must be an object")
        d = dict(tc)
        if "tie_word_embeddings" in hf and "tie_word_embeddings" not in d:
            d["tie_word_embeddings"] = hf["tie_word_embeddings"]     # top-level setting wins
        return d

    def model_type_of(self, hf):
        return "gemma3_text"

    def rope(self, d, v):
        rp = d.get("rope_parameters")
        local = self.field("rope_local_base_freq").read(d)
        if isinstance(rp, dict) and ("full_attention" in rp or "sliding_attention" in rp):
            full = rp.get("full_attention") or {}
            slid = rp.get("sliding_attention") or {}
            for k, x in (("full_attention", full), ("sliding_attention", slid)):
                if not isinstance(x, dict):
                    raise _err(f"rope_parameters.{k} must be an object")
            theta = rope_theta(full, v["rope_theta"], "rope_parameters.full_attention.")
            scaling = rope_scaling(full, "rope_parameters.full_attention")
            local = rope_theta(slid, local, "rope_parameters.sliding_attention.")
            local_scaling = rope_scaling(slid, "rope_parameters.sliding_attention")
        else:
            theta, scaling, _ = ArchSpec.rope(self, d, v)
            local_scaling = None
        return theta, scaling, {"rope_local_base_freq": local,
                                "local_rope_scaling": local_scaling}

    def layer_types(self, d, v):
        if d.get("layer_types") is not None:
            return d["layer_types"]
        pattern = Field("sliding_window_pattern", "int", default=6, minimum=1).read(d)
        return ["sliding_attention" if (i + 1) % pattern else "full_attention"
                for i in range(v["num_hidden_layers"])]

    def to_dict(self, cfg):
        out = dict(query_pre_attn_scalar=cfg.query_pre_attn_scalar,
                   rope_local_base_freq=cfg.rope_local_base_freq,
                   attn_logit_softcapping=cfg.attn_logit_softcapping,
                   final_logit_softcapping=cfg.final_logit_softcapping)
        if cfg.local_rope_scaling is not None:
            out["rope_parameters"] = {
                "full_attention": dict(cfg.rope_scaling or {"rope_type": "default"},
                                       rope_theta=cfg.rope_theta),
                "sliding_attention": dict(cfg.local_rope_scaling,
                                          rope_theta=cfg.rope_local_base_freq)}
        return out

    def gguf_extra(self, arch, meta, cfg):
        sw = meta.get(f"{arch}.attention.sliding_window")
        pattern = 6                         # 5 local layers, then 1 global
        return dict(
            hidden_activation="gelu_pytorch_tanh",
            query_pre_attn_scalar=256,      # not in the GGUF; 256 for the released sizes
            rope_local_base_freq=10000.0,   # not in the GGUF
            sliding_window_pattern=pattern,
            sliding_window=sw if sw is not None else 512,
            layer_types=["full_attention" if (i + 1) % pattern == 0 else "sliding_attention"
                         for i in range(cfg["num_hidden_layers"])],
            final_logit_softcapping=None,
            attn_logit_softcapping=None,
            rope_scaling=cfg.get("rope_scaling"))


SPEC = Gemma3Spec(
    name="gemma3",
    model_types=("gemma3_text", "gemma3"),
    hf_architecture="Gemma3ForCausalLM",
    model_class="mlxcy.models.gemma3:Gemma3Model",
    # Gemma3TextConfig's defaults (the multimodal checkpoints' text_config is sparse)
    fields=fields(
        [f for f in BASE_FIELDS if f.name != "hidden_act"],
        vocab_size=dict(default=262208), hidden_size=dict(default=2304),
        intermediate_size=dict(default=9216), num_hidden_layers=dict(default=26),
        num_attention_heads=dict(default=8), num_key_value_heads=dict(default=4),
        head_dim=dict(default=256), rope_theta=dict(default=1_000_000.0),
        sliding_window=dict(default=4096, nullable=False),
        tie_word_embeddings=dict(default=True), max_position_embeddings=dict(default=131072),
        attention_bias=Field("attention_bias", "bool", default=False),
        query_pre_attn_scalar=Field("query_pre_attn_scalar", "float", default=256,
                                    minimum=1e-6),
        rope_local_base_freq=Field("rope_local_base_freq", "float", default=10_000.0,
                                   minimum=1e-6),
        attn_logit_softcapping=Field("attn_logit_softcapping", "float", default=None,
                                     minimum=0.0, nullable=True),
        final_logit_softcapping=Field("final_logit_softcapping", "float", default=None,
                                      minimum=0.0, nullable=True),
        hidden_activation=Field("hidden_activation", "str", default="gelu_pytorch_tanh",
                                choices=_GELU)),
    qkv_bias="attention_bias",
    o_bias="attention_bias",
    qk_norm=True,
    norm_offset=1.0,
    block_norms=("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                 "post_feedforward_layernorm"),
    weight_prefixes=(("model.language_model.", "model."), ("language_model.", "")),
    dropped_prefixes=("vision_tower.", "multi_modal_projector.", "model.vision_tower.",
                      "model.multi_modal_projector."),
    gguf_architectures=("gemma3",),
    gguf_layer_names=dict(GGUF_LAYER_NAMES, post_attention_norm="post_attention_layernorm",
                          ffn_norm="pre_feedforward_layernorm",
                          post_ffw_norm="post_feedforward_layernorm"),
    gguf_norm_plus_one=True,
    chat_template="gemma3",
)
