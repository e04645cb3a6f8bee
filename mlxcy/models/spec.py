"""Architecture specs: everything mlxcy knows of a model family, declared once.

A family (mlxcy/models/families/<name>.py) is one `ArchSpec` instance.  It says:

- which config.json `model_type` values it reads, and its config fields with
  their types, bounds and defaults (`fields`), plus the few rules that derive
  one value from others (`head_dim`, `layer_types`, RoPE);
- its tensors: names and shapes of every weight, which projections carry
  biases, whether q/k are normalized per head, which extra norms a block has,
  whether norms are stored as (1 + w), the tied head (`modules`);
- its GGUF names: the llama.cpp architecture, tensor names, metadata keys,
  values GGUF files leave out, and the stored-value quirks (llama.cpp's q/k
  row permutation, Gemma's (1 + w) norms);
- its forward: the Model class that runs it (`model_class`; the shared
  pre-norm decoder of mlxcy/models/base.pyx unless the family has its own).

The loader, the config validator, the GGUF reader's name mapping, the
converter and LoRA's target names all read these; nothing outside
mlxcy/models/families/ switches on a model type.  docs/internals.md ("Adding
a model family") has the steps.
"""
from __future__ import annotations

import copy
import importlib
import math
import re
from dataclasses import dataclass

from mlxcy.errors import ModelFormatError

__all__ = ["ArchSpec", "Field", "Module", "ConfigError", "LAYER_LINEARS", "GGUF_LAYER_NAMES",
           "GGUF_TOP_NAMES", "GGUF_KEYS"]


class ConfigError(ModelFormatError):
    """A config value of the wrong type, out of range, or inconsistent with
    another (the message names the key)."""


def _err(msg):
    return ConfigError(f"config: {msg}")


_MISSING = object()


# ------------------------------------------------------------------ fields ---

class Field:
    """One config.json key: its type ("int", "float", "bool", "str", "list",
    "dict"), bounds, default (absent: required) and whether null is allowed
    (then None is a value; otherwise null means "use the default")."""

    __slots__ = ("name", "kind", "default", "minimum", "maximum", "nullable", "choices")

    def __init__(self, name, kind, default=_MISSING, minimum=None, maximum=None,
                 nullable=False, choices=None):
        self.name, self.kind, self.default = name, kind, default
        self.minimum, self.maximum = minimum, maximum
        self.nullable, self.choices = nullable, choices

    def replace(self, **kw):
        f = copy.copy(self)
        for k, v in kw.items():
            setattr(f, k, v)
        return f

    def read(self, d: dict, where: str = ""):
        """The validated value of this field in dict d (where: a prefix for
        the key in messages, e.g. 'rope_parameters.')."""
        key = where + self.name
        v = d.get(self.name)
        if v is None:
            if self.nullable and self.name in d:
                return None
            if self.default is _MISSING:
                raise _err(f"missing required field {key!r}")
            v = self.default
            if v is None:
                return None
        return self.check(v, key)

    def check(self, v, key):
        k = self.kind
        if k == "int":
            if isinstance(v, bool) or not isinstance(v, (int, float)) or \
                    (isinstance(v, float) and not v.is_integer()):
                raise _err(f"field {key!r} must be an integer, got {v!r}")
            v = int(v)
        elif k == "float":
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise _err(f"field {key!r} must be a finite number, got {v!r}")
            v = float(v)
        elif k == "bool":
            if not isinstance(v, bool):
                raise _err(f"field {key!r} must be true or false, got {v!r}")
        elif k == "str":
            if not isinstance(v, str):
                raise _err(f"field {key!r} must be a string, got {v!r}")
        elif k == "list":
            if not isinstance(v, (list, tuple)):
                raise _err(f"field {key!r} must be a list, got {type(v).__name__}")
        elif k == "dict":
            if not isinstance(v, dict):
                raise _err(f"field {key!r} must be an object, got {type(v).__name__}")
        if self.minimum is not None and v < self.minimum:
            raise _err(f"field {key!r} must be >= {self.minimum}, got {v}")
        if self.maximum is not None and v > self.maximum:
            raise _err(f"field {key!r} must be <= {self.maximum}, got {v}")
        if self.choices is not None and v not in self.choices:
            raise _err(f"field {key!r}: unsupported value {v!r} "
                       f"(supported: {', '.join(map(str, self.choices))})")
        return v


def fields(base, **changes):
    """A field tuple: the fields `base` with some fields' settings changed
    (name=dict(default=...)) or new fields added (name=Field(...))."""
    out = {f.name: f for f in base}
    for name, ch in changes.items():
        out[name] = ch if isinstance(ch, Field) else out[name].replace(**ch)
    return tuple(out.values())


# Sanity bounds: far above any released model, low enough that no size
# derived from them overflows or allocates for minutes.
BASE_FIELDS = (
    Field("vocab_size", "int", minimum=1, maximum=1 << 24),
    Field("hidden_size", "int", minimum=1, maximum=1 << 17),
    Field("intermediate_size", "int", minimum=1, maximum=1 << 20),
    Field("num_hidden_layers", "int", minimum=1, maximum=4096),
    Field("num_attention_heads", "int", minimum=1, maximum=4096),
    Field("num_key_value_heads", "int", default=None, minimum=1, maximum=4096),
    Field("head_dim", "int", default=None, minimum=2, maximum=1 << 14),
    Field("rms_norm_eps", "float", default=1e-6, minimum=0.0, maximum=1.0),
    Field("rope_theta", "float", default=10000.0, minimum=1e-6),
    Field("tie_word_embeddings", "bool", default=False),
    Field("max_position_embeddings", "int", default=2048, minimum=1, maximum=1 << 28),
    Field("sliding_window", "int", default=None, minimum=1, maximum=1 << 28, nullable=True),
    Field("hidden_act", "str", default="silu", choices=("silu",)),
    Field("partial_rotary_factor", "float", default=1.0, minimum=1.0, maximum=1.0),
)

_ROPE_TYPES = ("default", "linear", "dynamic", "llama3")
_LAYER_TYPES = ("full_attention", "sliding_attention")
_ROPE_FIELDS = {f.name: f for f in (
    Field("factor", "float", minimum=1e-6),
    Field("low_freq_factor", "float", default=1.0, minimum=1e-6),
    Field("high_freq_factor", "float", default=4.0, minimum=1e-6),
    Field("original_max_position_embeddings", "int", default=8192, minimum=1, maximum=1 << 28),
    Field("rope_theta", "float", minimum=1e-6))}


def rope_scaling(rs, where):
    """Normalize a rope_scaling / rope_parameters dict; None for plain RoPE."""
    if rs is None:
        return None
    if not isinstance(rs, dict):
        raise _err(f"{where} must be an object, got {type(rs).__name__}")
    kind = rs.get("rope_type", rs.get("type", "default"))
    if kind not in _ROPE_TYPES:
        raise _err(f"{where}: unsupported rope type {kind!r} "
                   f"(supported: {', '.join(_ROPE_TYPES)})")
    if kind == "default":
        return None
    p = where + "."
    out = {"rope_type": kind, "factor": _ROPE_FIELDS["factor"].read(rs, p)}
    if kind == "llama3":
        for k in ("low_freq_factor", "high_freq_factor", "original_max_position_embeddings"):
            out[k] = _ROPE_FIELDS[k].read(rs, p)
        if out["high_freq_factor"] == out["low_freq_factor"]:
            raise _err(f"{where}: high_freq_factor must differ from low_freq_factor")
    return out


def rope_theta(rp, default, where):
    return _ROPE_FIELDS["rope_theta"].read({"rope_theta": rp.get("rope_theta", default)}, where)


# ----------------------------------------------------------------- tensors ---

@dataclass(frozen=True)
class Module:
    """One weight-holding module: `path` (its tensors are path + ".weight",
    ".bias", and for a quantized linear ".scales"/".biases"), kind ("linear",
    "embedding" or "norm"), the float weight's shape, the config keys the
    shape comes from (for messages), a bias, and a norm's stored offset
    (1.0: the forward uses 1 + w)."""
    path: str
    kind: str
    shape: tuple
    keys: tuple = ()
    bias: bool = False
    offset: float = 0.0

    @property
    def quantizable(self):
        return self.kind in ("linear", "embedding")


# The decoder layer's linear layers, relative to model.layers.N (mlx-lm's
# LoRA target names).
LAYER_LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                 "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")

# llama.cpp tensor names (blk.N.<part>) -> Hugging Face layer-relative names,
# for the pre-norm layout (llama, qwen, mistral).  Gemma's sandwich norms
# change the norms' names (families/gemma3.py).
GGUF_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm", "attn_norm": "input_layernorm",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
    "ffn_norm": "post_attention_layernorm",
}
GGUF_TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm",
                  "output": "lm_head"}
# config key -> GGUF metadata key (after "<arch>.")
GGUF_KEYS = {
    "hidden_size": "embedding_length", "num_attention_heads": "attention.head_count",
    "num_key_value_heads": "attention.head_count_kv", "head_dim": "attention.key_length",
    "intermediate_size": "feed_forward_length", "num_hidden_layers": "block_count",
    "max_position_embeddings": "context_length",
    "rms_norm_eps": "attention.layer_norm_rms_epsilon", "rope_theta": "rope.freq_base",
    "vocab_size": "vocab_size", "sliding_window": "attention.sliding_window",
}
_GGUF_LAYER = re.compile(r"^blk\.(\d+)\.(.+)\.(weight|bias)$")


def _f32(v) -> float:
    """A float32 metadata value as the shortest decimal (1e-05, not 9.9999997e-06)."""
    import numpy as np
    return float(str(np.float32(v)))


# -------------------------------------------------------------------- spec ---

class ArchSpec:
    """A model family.  Families set the class attributes below (or pass them
    to the constructor) and override a hook only where the family's rule
    differs from the shared one."""

    name: str = None                  # the family (mlxcy.models.families.<name>)
    model_types: tuple = ()           # config.json model_type values read as this family
    hf_architecture: str = None       # config.json "architectures" entry
    model_class: str = "mlxcy.models.base:Model"   # the forward (module:class)
    fields: tuple = BASE_FIELDS

    # tensors: a bool, or the name of the bool config field that decides it
    qkv_bias = False
    o_bias = False
    mlp_bias = False
    qk_norm = False                   # per-head RMSNorm of q and k (self_attn.q_norm/k_norm)
    norm_offset = 0.0                 # 1.0: RMSNorm weights are stored as w for (1 + w)
    block_norms = ("input_layernorm", "post_attention_layernorm")
    weight_prefixes = ()              # (old, new) renames of checkpoint tensor names
    dropped_prefixes = ()             # checkpoint tensors no text model uses

    # GGUF
    gguf_architectures: tuple = ()    # general.architecture values read as this family
    gguf_layer_names = GGUF_LAYER_NAMES
    gguf_keys = GGUF_KEYS
    gguf_permute_qk = False           # llama.cpp permuted q/k rows for its interleaved RoPE
    gguf_norm_plus_one = False        # GGUF stores RMSNorm weights as (1 + w)

    chat_template: str | None = None  # mlxcy.chat.builtin() name for checkpoints without one

    def __init__(self, **kw):
        for k, v in kw.items():
            if not hasattr(type(self), k):
                raise TypeError(f"ArchSpec: unknown attribute {k!r}")
            setattr(self, k, v)
        self._fields = {f.name: f for f in self.fields}

    def __repr__(self):
        return f"<ArchSpec {self.name}: {', '.join(self.model_types)}>"

    # -- config ---------------------------------------------------------------
    def field(self, name):
        return self._fields[name]

    def text_config(self, hf: dict) -> dict:
        """The language model's part of a config.json dict."""
        return hf

    def parse(self, hf: dict) -> dict:
        """The validated fields of a ModelConfig (mlxcy.models.config) from a
        config.json dict, as keywords; raises ConfigError naming the key."""
        raw = copy.deepcopy(hf)
        d = self.text_config(hf)
        v = {name: f.read(d) for name, f in self._fields.items()}
        heads = v["num_attention_heads"]
        if v["num_key_value_heads"] is None:
            v["num_key_value_heads"] = heads
        kv = v["num_key_value_heads"]
        if heads % kv:
            raise _err(f"num_attention_heads ({heads}) must be a multiple of "
                       f"num_key_value_heads ({kv})")
        if v["head_dim"] is None:
            v["head_dim"] = self.default_head_dim(v)
        if v["head_dim"] % 2:
            raise _err(f"head_dim must be even for RoPE, got {v['head_dim']}")
        theta, scaling, extra = self.rope(d, v)
        layer_types = self.layer_types(d, v)
        if not isinstance(layer_types, (list, tuple)) or len(layer_types) != v["num_hidden_layers"]:
            raise _err(f"layer_types must list {v['num_hidden_layers']} entries "
                       f"(num_hidden_layers)")
        for t in layer_types:
            if t not in _LAYER_TYPES:
                raise _err(f"unsupported layer type {t!r} in layer_types")
        sliding = v["sliding_window"]
        if "sliding_attention" in layer_types:
            if sliding is None:
                raise _err("layer_types has sliding_attention layers but sliding_window is null")
        elif not self.keeps_window:
            sliding = None
        kw = dict(v)
        kw.update(model_type=self.model_type_of(hf), rope_theta=theta, rope_scaling=scaling,
                  layer_types=list(layer_types), sliding_window=sliding,
                  attention_bias=self.flag(self.qkv_bias, v),
                  mlp_bias=self.flag(self.mlp_bias, v), raw=raw, **extra)
        return kw

    keeps_window = False              # keep sliding_window in the config with no sliding layer

    def model_type_of(self, hf):
        return hf["model_type"]

    def flag(self, f, values):
        """A tensor-layout flag (bool, or a config field's name) for these values."""
        if isinstance(f, str):
            return bool(values[f] if isinstance(values, dict) else getattr(values, f))
        return bool(f)

    def default_head_dim(self, v):
        """head_dim when config.json has none: hidden_size / num_attention_heads."""
        hidden, heads = v["hidden_size"], v["num_attention_heads"]
        if hidden % heads:
            raise _err(f"hidden_size ({hidden}) is not a multiple of "
                       f"num_attention_heads ({heads}) and no head_dim is given")
        return hidden // heads

    def rope(self, d, v):
        """(rope_theta, rope_scaling, extra ModelConfig values): transformers 5's
        `rope_parameters`, or the older rope_theta / rope_scaling keys."""
        rp = d.get("rope_parameters")
        if rp is not None and not isinstance(rp, dict):
            raise _err("rope_parameters must be an object")
        if rp is not None:
            return (rope_theta(rp, v["rope_theta"], "rope_parameters."),
                    rope_scaling(rp, "rope_parameters"), {})
        return v["rope_theta"], rope_scaling(d.get("rope_scaling"), "rope_scaling"), {}

    def layer_types(self, d, v):
        """Each layer's attention: config.json's layer_types, else all full."""
        lt = d.get("layer_types")
        return ["full_attention"] * v["num_hidden_layers"] if lt is None else lt

    def to_dict(self, cfg) -> dict:
        """Family-specific keys of a config.json that parse() reads back to cfg."""
        return {}

    # -- tensors --------------------------------------------------------------
    def modules(self, cfg):
        """Every weight-holding module of a model with config cfg, in order:
        the embedding, each layer's, the final norm, the head (unless tied)."""
        top = self.top_modules(cfg)
        out = [top["embed_tokens"]]
        for i in range(cfg.num_hidden_layers):
            out.extend(self.layer_modules(cfg, i).values())
        out.append(top["norm"])
        if "lm_head" in top:
            out.append(top["lm_head"])
        return out

    def top_modules(self, cfg) -> dict:
        """The modules outside the layers: embed_tokens, norm, lm_head (untied)."""
        h, V = cfg.hidden_size, cfg.vocab_size
        out = {"embed_tokens": Module("model.embed_tokens", "embedding", (V, h),
                                      ("vocab_size", "hidden_size")),
               "norm": Module("model.norm", "norm", (h,), ("hidden_size",),
                              offset=self.norm_offset)}
        if not cfg.tie_word_embeddings:
            out["lm_head"] = Module("lm_head", "linear", (V, h), ("vocab_size", "hidden_size"))
        return out

    def layer_modules(self, cfg, i) -> dict:
        """Layer i's modules by role: q/k/v/o_proj, q/k_norm, gate/up/down_proj
        and the block norms (named as in `block_norms`)."""
        h, H, Hkv, D, F = (cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads,
                           cfg.head_dim, cfg.intermediate_size)
        p = f"model.layers.{i}."
        qkv, o, mlp = (self.flag(b, cfg) for b in (self.qkv_bias, self.o_bias, self.mlp_bias))
        hk = ("hidden_size",)
        qk = ("num_attention_heads*head_dim",)
        kvk = ("num_key_value_heads*head_dim",)
        fk = ("intermediate_size",)
        q, k, v, o_, gate, up, down = (p + n for n in LAYER_LINEARS)
        m = {
            "q_proj": Module(q, "linear", (H * D, h), qk + hk, qkv),
            "k_proj": Module(k, "linear", (Hkv * D, h), kvk + hk, qkv),
            "v_proj": Module(v, "linear", (Hkv * D, h), kvk + hk, qkv),
            "o_proj": Module(o_, "linear", (h, H * D), hk + qk, o),
        }
        if self.qk_norm:
            m["q_norm"] = Module(p + "self_attn.q_norm", "norm", (D,), ("head_dim",),
                                 offset=self.norm_offset)
            m["k_norm"] = Module(p + "self_attn.k_norm", "norm", (D,), ("head_dim",),
                                 offset=self.norm_offset)
        m["gate_proj"] = Module(gate, "linear", (F, h), fk + hk, mlp)
        m["up_proj"] = Module(up, "linear", (F, h), fk + hk, mlp)
        m["down_proj"] = Module(down, "linear", (h, F), hk + fk, mlp)
        for n in self.block_norms:
            m[n] = Module(p + n, "norm", (h,), hk, offset=self.norm_offset)
        return m

    def rename(self, name):
        """A checkpoint tensor's name in the text model (None: not used)."""
        if name.startswith(self.dropped_prefixes):
            return None
        for old, new in self.weight_prefixes:
            if name.startswith(old):
                return new + name[len(old):]
        return name

    def build(self, cfg, weights, quantization=None, dtype=None):
        """The model (self.model_class) over HF-named weights."""
        mod, _, cls = self.model_class.partition(":")
        return getattr(importlib.import_module(mod), cls)(cfg, weights, quantization, dtype)

    # -- GGUF -----------------------------------------------------------------
    def hf_name(self, gguf_name: str) -> str | None:
        """The Hugging Face name of a GGUF tensor (None for tensors HF does not
        keep, such as llama.cpp's precomputed rope_freqs)."""
        m = _GGUF_LAYER.match(gguf_name)
        if m:
            i, part, kind = m.groups()
            hf = self.gguf_layer_names.get(part)
            return None if hf is None else f"model.layers.{i}.{hf}.{kind}"
        base, _, kind = gguf_name.rpartition(".")
        if base in GGUF_TOP_NAMES and kind in ("weight", "bias"):
            return f"{GGUF_TOP_NAMES[base]}.{kind}"
        return None

    def gguf_permute_heads(self, hf_name, cfg) -> int | None:
        """For llama.cpp's permuted q/k rows: the head count to un-permute
        tensor hf_name over (also applies to quantized scales/biases)."""
        if not self.gguf_permute_qk:
            return None
        if ".self_attn.q_proj." in hf_name:
            return cfg["num_attention_heads"]
        if ".self_attn.k_proj." in hf_name:
            return cfg["num_key_value_heads"]
        return None

    def gguf_plus_one(self, hf_name) -> bool:
        """True when GGUF stores this tensor as (1 + w) (Gemma's norms)."""
        return self.gguf_norm_plus_one and hf_name.endswith("norm.weight")

    def gguf_config(self, arch, meta, tensors, path) -> dict:
        """A Hugging Face-style config dict from GGUF metadata (`meta`) and
        tensor table (`tensors`: name -> {"shape", ...})."""
        from mlxcy.errors import GGUFError

        def get(key, default=None, required=False):
            mk = f"{arch}.{self.gguf_keys[key]}"
            v = meta.get(mk)
            if v is None:
                if required:
                    raise GGUFError(f"{path}: metadata key {mk} is missing")
                return default
            if isinstance(v, list):          # per-layer values: all equal here
                if len(set(v)) != 1:
                    raise GGUFError(f"{path}: per-layer values of {mk} ({sorted(set(v))}) "
                                    "are not supported")
                v = v[0]
            return v

        hidden = get("hidden_size", required=True)
        heads = get("num_attention_heads", required=True)
        vocab = get("vocab_size")
        if vocab is None:
            toks = meta.get("tokenizer.ggml.tokens")
            emb = tensors.get("token_embd.weight")
            vocab = len(toks) if toks is not None else (emb["shape"][0] if emb else None)
        if vocab is None:
            raise GGUFError(f"{path}: cannot tell the vocabulary size")
        cfg = {
            "architectures": [self.hf_architecture],
            "model_type": self.model_types[0],
            "vocab_size": vocab,
            "hidden_size": hidden,
            "intermediate_size": get("intermediate_size", required=True),
            "num_hidden_layers": get("num_hidden_layers", required=True),
            "num_attention_heads": heads,
            "num_key_value_heads": get("num_key_value_heads", heads),
            "head_dim": get("head_dim"),
            "max_position_embeddings": get("max_position_embeddings", 4096),
            "rms_norm_eps": _f32(get("rms_norm_eps", 1e-6)),
            "rope_theta": _f32(get("rope_theta", 10000.0)),
            "tie_word_embeddings": "output.weight" not in tensors,
        }
        if cfg["head_dim"] is None:         # as llama.cpp: embedding_length / head_count
            ok = isinstance(hidden, int) and isinstance(heads, int) and heads > 0
            if ok and hidden % heads == 0:
                cfg["head_dim"] = hidden // heads
            else:
                cfg.pop("head_dim")
        for src, dst in (("tokenizer.ggml.bos_token_id", "bos_token_id"),
                         ("tokenizer.ggml.eos_token_id", "eos_token_id"),
                         ("tokenizer.ggml.padding_token_id", "pad_token_id")):
            if src in meta:
                cfg[dst] = meta[src]
        scaling = meta.get(f"{arch}.rope.scaling.type")
        if scaling and scaling != "none":
            factor = _f32(meta.get(f"{arch}.rope.scaling.factor", 1.0))
            cfg["rope_scaling"] = {"type": scaling, "rope_type": scaling, "factor": factor}
            orig = meta.get(f"{arch}.rope.scaling.original_context_length")
            if scaling == "yarn" and orig:
                cfg["rope_scaling"]["original_max_position_embeddings"] = orig
        # biases: as the tensors say (config flags only; fixed ones need no key)
        for flag, gname in ((self.qkv_bias, "blk.0.attn_q.bias"),
                            (self.mlp_bias, "blk.0.ffn_up.bias")):
            if isinstance(flag, str):
                cfg[flag] = gname in tensors
        cfg.update(self.gguf_extra(arch, meta, cfg))
        return cfg

    def gguf_extra(self, arch, meta, cfg) -> dict:
        """Config values a family's GGUF files store elsewhere or leave out."""
        return {"hidden_act": "silu"}

    def gguf_key(self, arch, config_key):
        """The GGUF metadata key a config key is read from (for messages)."""
        k = self.gguf_keys.get(config_key)
        return None if k is None else f"{arch}.{k}"
