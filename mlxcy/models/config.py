"""ModelConfig: the fields mlxcy's decoders need, parsed and validated from a
Hugging Face config.json dict (old `rope_theta`/`rope_scaling` keys and
transformers 5's `rope_parameters` both work; the multimodal `gemma3`
checkpoint's nested `text_config` is read as its language model)."""
from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

# model_type -> family (the file in mlxcy/models/ implementing it)
FAMILIES = {
    "llama": "llama",
    "qwen2": "qwen2",
    "qwen3": "qwen3",
    "gemma3_text": "gemma3",
    "gemma3": "gemma3",
}

# transformers' defaults for fields a config.json may leave out
_DEFAULTS = {
    "llama": dict(rms_norm_eps=1e-6, rope_theta=10000.0, tie_word_embeddings=False,
                  max_position_embeddings=2048),
    "qwen2": dict(rms_norm_eps=1e-6, rope_theta=10000.0, tie_word_embeddings=False,
                  max_position_embeddings=32768),
    "qwen3": dict(rms_norm_eps=1e-6, rope_theta=10000.0, tie_word_embeddings=False,
                  max_position_embeddings=32768, head_dim=128),
    # Gemma3TextConfig's defaults (the multimodal checkpoints' text_config is sparse)
    "gemma3": dict(vocab_size=262208, hidden_size=2304, intermediate_size=9216,
                   num_hidden_layers=26, num_attention_heads=8, num_key_value_heads=4,
                   head_dim=256, rms_norm_eps=1e-6, rope_theta=1_000_000.0,
                   rope_local_base_freq=10_000.0, query_pre_attn_scalar=256,
                   sliding_window=4096, tie_word_embeddings=True,
                   max_position_embeddings=131072),
}

_ROPE_TYPES = ("default", "linear", "dynamic", "llama3")
_LAYER_TYPES = ("full_attention", "sliding_attention")


def _err(msg):
    return ValueError(f"config: {msg}")


def _int(d, key, default=None, minimum=1):
    v = d.get(key, default)
    if v is None:
        raise _err(f"missing required field {key!r}")
    if isinstance(v, bool) or not isinstance(v, (int, float)) or int(v) != v:
        raise _err(f"field {key!r} must be an integer, got {v!r}")
    v = int(v)
    if v < minimum:
        raise _err(f"field {key!r} must be >= {minimum}, got {v}")
    return v


def _float(d, key, default=None, positive=True, allow_none=False):
    v = d.get(key, default)
    if v is None:
        if allow_none:
            return None
        raise _err(f"missing required field {key!r}")
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise _err(f"field {key!r} must be a finite number, got {v!r}")
    if positive and v <= 0:
        raise _err(f"field {key!r} must be positive, got {v}")
    return float(v)


def _rope_scaling(rs, where):
    """Normalize a rope_scaling / rope_parameters dict; None for plain RoPE."""
    if rs is None:
        return None
    if not isinstance(rs, dict):
        raise _err(f"{where} must be a dict, got {type(rs).__name__}")
    kind = rs.get("rope_type", rs.get("type", "default"))
    if kind not in _ROPE_TYPES:
        raise _err(f"{where}: unsupported rope type {kind!r} "
                   f"(supported: {', '.join(_ROPE_TYPES)})")
    if kind == "default":
        return None
    out = {"rope_type": kind, "factor": _float(rs, "factor")}
    if kind == "llama3":
        out["low_freq_factor"] = _float(rs, "low_freq_factor", 1.0)
        out["high_freq_factor"] = _float(rs, "high_freq_factor", 4.0)
        out["original_max_position_embeddings"] = _int(rs, "original_max_position_embeddings",
                                                       8192)
        if out["high_freq_factor"] == out["low_freq_factor"]:
            raise _err(f"{where}: high_freq_factor must differ from low_freq_factor")
    return out


@dataclass
class ModelConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict | None = None
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    max_position_embeddings: int = 2048
    # Gemma 3
    query_pre_attn_scalar: float | None = None
    sliding_window: int | None = None
    layer_types: list = field(default_factory=list)
    rope_local_base_freq: float | None = None
    local_rope_scaling: dict | None = None
    attn_logit_softcapping: float | None = None
    final_logit_softcapping: float | None = None
    raw: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def family(self) -> str:
        return FAMILIES[self.model_type]

    @classmethod
    def from_dict(cls, hf: dict) -> "ModelConfig":
        if isinstance(hf, ModelConfig):
            return hf
        if not isinstance(hf, dict):
            raise TypeError(f"config: expected a dict (config.json), got {type(hf).__name__}")
        raw = copy.deepcopy(hf)
        mt = hf.get("model_type")
        if mt is None:
            raise _err("missing 'model_type'")
        if mt not in FAMILIES:
            raise ValueError(f"config: unsupported model_type {mt!r} "
                             f"(supported: {', '.join(sorted(FAMILIES))})")
        d = hf
        if mt == "gemma3":
            tc = hf.get("text_config")
            if tc is None:
                tc = {}
            if not isinstance(tc, dict):
                raise _err("gemma3: 'text_config' must be a dict")
            d = dict(tc)
            for k in ("tie_word_embeddings",):   # top-level settings win
                if k in hf and k not in d:
                    d[k] = hf[k]
            mt = "gemma3_text"
        fam = FAMILIES[mt]
        defaults = _DEFAULTS[fam]
        g = lambda k: d.get(k, defaults.get(k))  # noqa: E731
        gd = {k: g(k) for k in set(d) | set(defaults)}

        hidden = _int(gd, "hidden_size")
        heads = _int(gd, "num_attention_heads")
        kv = _int(gd, "num_key_value_heads", heads)
        if heads % kv:
            raise _err(f"num_attention_heads ({heads}) must be a multiple of "
                       f"num_key_value_heads ({kv})")
        if d.get("head_dim") is not None:
            head_dim = _int(gd, "head_dim")
        elif fam in ("llama", "qwen2"):
            if hidden % heads:
                raise _err(f"hidden_size ({hidden}) is not a multiple of "
                           f"num_attention_heads ({heads}) and no head_dim is given")
            head_dim = hidden // heads
        else:
            head_dim = _int(gd, "head_dim")
        if head_dim % 2:
            raise _err(f"head_dim must be even for RoPE, got {head_dim}")
        layers = _int(gd, "num_hidden_layers")

        # RoPE: transformers 5 `rope_parameters`, or the older keys.
        rp = d.get("rope_parameters")
        local_theta = None
        local_scaling = None
        if fam == "gemma3":
            if isinstance(rp, dict) and ("full_attention" in rp or "sliding_attention" in rp):
                full = rp.get("full_attention") or {}
                slid = rp.get("sliding_attention") or {}
                theta = _float(full, "rope_theta", g("rope_theta"))
                scaling = _rope_scaling(full, "rope_parameters.full_attention")
                local_theta = _float(slid, "rope_theta", g("rope_local_base_freq"))
                local_scaling = _rope_scaling(slid, "rope_parameters.sliding_attention")
            else:
                theta = _float(gd, "rope_theta")
                scaling = _rope_scaling(d.get("rope_scaling"), "rope_scaling")
                local_theta = _float(gd, "rope_local_base_freq")
        elif isinstance(rp, dict):
            theta = _float(rp, "rope_theta", g("rope_theta"))
            scaling = _rope_scaling(rp, "rope_parameters")
        else:
            theta = _float(gd, "rope_theta")
            scaling = _rope_scaling(d.get("rope_scaling"), "rope_scaling")
        if rp is not None and not isinstance(rp, dict):
            raise _err("rope_parameters must be a dict")

        # Attention layout per layer
        layer_types = d.get("layer_types")
        sliding = d.get("sliding_window", defaults.get("sliding_window"))
        if fam == "gemma3":
            sliding = _int(gd, "sliding_window")
            if layer_types is None:
                pattern = _int(d, "sliding_window_pattern", 6)
                layer_types = ["sliding_attention" if (i + 1) % pattern else "full_attention"
                               for i in range(layers)]
        elif fam == "qwen2" and layer_types is None and d.get("use_sliding_window"):
            mwl = _int(d, "max_window_layers", layers, minimum=0)
            layer_types = ["sliding_attention" if i >= mwl else "full_attention"
                           for i in range(layers)]
        if layer_types is None:
            layer_types = ["full_attention"] * layers
        if not isinstance(layer_types, (list, tuple)) or len(layer_types) != layers:
            raise _err(f"layer_types must list {layers} entries (num_hidden_layers)")
        for t in layer_types:
            if t not in _LAYER_TYPES:
                raise _err(f"unsupported layer type {t!r} in layer_types")
        if fam == "qwen2" and not d.get("use_sliding_window", False):
            layer_types = ["full_attention"] * layers
        if "sliding_attention" in layer_types:
            if sliding is None:
                raise _err("layer_types has sliding_attention layers but sliding_window is null")
            sliding = _int({"sliding_window": sliding}, "sliding_window")
        else:
            sliding = None if fam != "gemma3" else sliding

        if fam == "qwen2":
            attention_bias = True   # Qwen2 always has q/k/v biases (not o_proj)
        else:
            attention_bias = bool(d.get("attention_bias", False))

        cfg = cls(
            model_type=mt,
            vocab_size=_int(gd, "vocab_size"),
            hidden_size=hidden,
            intermediate_size=_int(gd, "intermediate_size"),
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=kv,
            head_dim=head_dim,
            rms_norm_eps=_float(gd, "rms_norm_eps"),
            rope_theta=theta,
            rope_scaling=scaling,
            tie_word_embeddings=bool(g("tie_word_embeddings")),
            attention_bias=attention_bias,
            mlp_bias=bool(d.get("mlp_bias", False)) if fam == "llama" else False,
            max_position_embeddings=_int(gd, "max_position_embeddings"),
            layer_types=list(layer_types),
            sliding_window=sliding,
            raw=raw,
        )
        if fam == "gemma3":
            cfg.query_pre_attn_scalar = _float(gd, "query_pre_attn_scalar")
            cfg.rope_local_base_freq = local_theta
            cfg.local_rope_scaling = local_scaling
            cfg.attn_logit_softcapping = _float(d, "attn_logit_softcapping", None,
                                                allow_none=True)
            cfg.final_logit_softcapping = _float(d, "final_logit_softcapping", None,
                                                 allow_none=True)
            act = d.get("hidden_activation", d.get("hidden_act", "gelu_pytorch_tanh"))
            if act not in ("gelu_pytorch_tanh", "gelu_tanh", "gelu_approx"):
                raise _err(f"gemma3: unsupported hidden_activation {act!r}")
        else:
            act = d.get("hidden_act", "silu")
            if act != "silu":
                raise _err(f"{mt}: unsupported hidden_act {act!r} (only 'silu')")
        if d.get("partial_rotary_factor", 1.0) not in (1, 1.0, None):
            raise _err("partial_rotary_factor != 1 is not supported")
        return cfg

    def to_dict(self) -> dict[str, Any]:
        """A config.json-style dict that from_dict reads back to this config."""
        out = {k: copy.deepcopy(getattr(self, k)) for k in (
            "model_type", "vocab_size", "hidden_size", "intermediate_size",
            "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
            "rms_norm_eps", "rope_theta", "rope_scaling", "tie_word_embeddings",
            "attention_bias", "mlp_bias", "max_position_embeddings", "layer_types")}
        if self.sliding_window is not None:
            out["sliding_window"] = self.sliding_window
        if self.family == "qwen2" and "sliding_attention" in self.layer_types:
            out["use_sliding_window"] = True
        if self.family == "gemma3":
            out.update(query_pre_attn_scalar=self.query_pre_attn_scalar,
                       rope_local_base_freq=self.rope_local_base_freq,
                       attn_logit_softcapping=self.attn_logit_softcapping,
                       final_logit_softcapping=self.final_logit_softcapping)
            if self.local_rope_scaling is not None:
                out["rope_parameters"] = {
                    "full_attention": dict(self.rope_scaling or {"rope_type": "default"},
                                           rope_theta=self.rope_theta),
                    "sliding_attention": dict(self.local_rope_scaling,
                                              rope_theta=self.rope_local_base_freq)}
        return out

    def replace(self, **kw) -> "ModelConfig":
        return dataclasses.replace(self, **kw)
