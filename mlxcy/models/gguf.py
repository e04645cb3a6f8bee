"""GGUF files → Hugging Face-named weights and a Hugging Face-style config dict.

- `read_header(path)`: mlxcy.gguf_reader's checked parser of the GGUF header
  (metadata and tensor table), the one every GGUF reader of mlxcy goes through.
- `load_gguf(path, dtype=None)`: the weights. Files whose tensors are all F32, F16,
  BF16, Q4_0, Q4_1 or Q8_0 keep their quantization (MLX's affine layout:
  `<name>.weight` uint32 packed, `<name>.scales`, `<name>.biases`); others (Q4_K,
  Q5_0, Q6_K ...) are dequantized with `gguf.quants.dequantize` to `dtype`.

Name mapping, llama.cpp → Hugging Face:
- `token_embd` → `model.embed_tokens`, `output_norm` → `model.norm`, `output` → `lm_head`
- `blk.N.attn_{q,k,v,output}` → `model.layers.N.self_attn.{q,k,v,o}_proj`
- `blk.N.attn_{q,k}_norm` → `self_attn.{q,k}_norm`, `blk.N.attn_norm` → `input_layernorm`
- `blk.N.ffn_{gate,up,down}` → `mlp.{gate,up,down}_proj`
- llama/qwen: `blk.N.ffn_norm` → `post_attention_layernorm`
- gemma: `blk.N.post_attention_norm` → `post_attention_layernorm`,
  `blk.N.ffn_norm` → `pre_feedforward_layernorm`, `blk.N.post_ffw_norm` →
  `post_feedforward_layernorm`

Value transforms:
- llama: q/k rows were permuted by llama.cpp for its interleaved RoPE; we undo it
  (also on quantized triplets: a row permutation applies to weight, scales, biases).
- gemma: RMSNorm weights are stored as (1 + w); we subtract 1.
"""
from __future__ import annotations

import re

import numpy as np

__all__ = ["GGUFError", "read_header", "gguf_config", "load_gguf", "hf_name",
           "NATIVE_TYPES", "TYPE_NAMES"]


from mlxcy.errors import GGUFError  # noqa: E402,F401  (re-exported)


# The header reader (metadata, tensor table, all checks) is mlxcy.gguf_reader,
# shared with the tokenizer, the chat templates and mlxcy.io.load_gguf.
from mlxcy.gguf_reader import (  # noqa: E402,F401  (re-exported)
    BLOCK as _BLOCK, NATIVE_TYPES, TYPE_NAMES, GGUFHeader, Skipped as _Skipped, read_header,
    check_model_metadata)

_FLOAT_TYPES = {0: np.float32, 1: np.float16, 28: np.float64}


# ---------------------------------------------------------------- config

def _f32(v) -> float:
    """A float32 metadata value as the shortest decimal (1e-05, not 9.9999997e-06)."""
    return float(str(np.float32(v)))


_MODEL_TYPES = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "gemma3": "gemma3_text"}
_ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM",
                  "qwen3": "Qwen3ForCausalLM", "gemma3": "Gemma3ForCausalLM"}


def gguf_config(header: GGUFHeader) -> dict:
    """A Hugging Face-style config dict from GGUF metadata (plus Gemma 3's
    values that GGUF files leave out)."""
    meta = header.metadata
    path = header.path
    arch = header.architecture
    check_model_metadata(header)
    if arch not in _MODEL_TYPES:
        raise GGUFError(f"{path}: unsupported GGUF architecture {arch!r} "
                        f"(supported: {', '.join(_MODEL_TYPES)})")

    def req(key):
        v = meta.get(f"{arch}.{key}")
        if v is None:
            raise GGUFError(f"{path}: metadata key {arch}.{key} is missing")
        return v

    hidden = int(req("embedding_length"))
    heads = int(req("attention.head_count"))
    kv = meta.get(f"{arch}.attention.head_count_kv", heads)
    if isinstance(kv, list):                 # per-layer counts: all equal here
        if len(set(kv)) != 1:
            raise GGUFError(f"{path}: per-layer kv head counts {set(kv)} are not supported")
        kv = kv[0]
    head_dim = meta.get(f"{arch}.attention.key_length") or hidden // heads
    emb = header.tensors.get("token_embd.weight")
    vocab = meta.get(f"{arch}.vocab_size")
    if vocab is None:
        toks = meta.get("tokenizer.ggml.tokens")
        vocab = len(toks) if toks is not None else (emb["shape"][0] if emb else None)
    if vocab is None:
        raise GGUFError(f"{path}: cannot tell the vocabulary size")
    ffn = req("feed_forward_length")
    if isinstance(ffn, list):
        ffn = ffn[0]
    cfg = {
        "architectures": [_ARCHITECTURES[arch]],
        "model_type": _MODEL_TYPES[arch],
        "vocab_size": int(vocab),
        "hidden_size": hidden,
        "intermediate_size": int(ffn),
        "num_hidden_layers": int(req("block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(kv),
        "head_dim": int(head_dim),
        "max_position_embeddings": int(meta.get(f"{arch}.context_length", 4096)),
        "rms_norm_eps": _f32(meta.get(f"{arch}.attention.layer_norm_rms_epsilon", 1e-6)),
        "rope_theta": _f32(meta.get(f"{arch}.rope.freq_base", 10000.0)),
        "tie_word_embeddings": "output.weight" not in header.tensors,
    }
    for src, dst in (("tokenizer.ggml.bos_token_id", "bos_token_id"),
                     ("tokenizer.ggml.eos_token_id", "eos_token_id"),
                     ("tokenizer.ggml.padding_token_id", "pad_token_id")):
        if src in meta:
            cfg[dst] = int(meta[src])
    scaling = meta.get(f"{arch}.rope.scaling.type")
    if scaling and scaling != "none":
        factor = _f32(meta.get(f"{arch}.rope.scaling.factor", 1.0))
        cfg["rope_scaling"] = {"type": scaling, "rope_type": scaling, "factor": factor}
        if scaling == "yarn":
            orig = meta.get(f"{arch}.rope.scaling.original_context_length")
            if orig:
                cfg["rope_scaling"]["original_max_position_embeddings"] = int(orig)
    if arch == "llama":
        cfg.update(hidden_act="silu", attention_bias=False, mlp_bias=False)
    elif arch in ("qwen2", "qwen3"):
        cfg.update(hidden_act="silu", use_sliding_window=False, sliding_window=None,
                   max_window_layers=cfg["num_hidden_layers"])
    elif arch == "gemma3":
        sw = meta.get("gemma3.attention.sliding_window")
        pattern = 6
        cfg.update(
            hidden_activation="gelu_pytorch_tanh",
            query_pre_attn_scalar=256,          # missing from the GGUF; 256 for these sizes
            rope_local_base_freq=10000.0,       # missing from the GGUF
            sliding_window_pattern=pattern,     # 5 local layers then 1 global
            sliding_window=int(sw) if sw is not None else 512,
            layer_types=["full_attention" if (i + 1) % pattern == 0 else "sliding_attention"
                         for i in range(cfg["num_hidden_layers"])],
            final_logit_softcapping=None,
            attn_logit_softcapping=None,
            rope_scaling=cfg.get("rope_scaling"),
        )
    return cfg


# ---------------------------------------------------------------- names

_LAYER = re.compile(r"^blk\.(\d+)\.(.+)\.(weight|bias)$")
_COMMON = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm", "attn_norm": "input_layernorm",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}
_LLAMA = dict(_COMMON, ffn_norm="post_attention_layernorm")
_GEMMA = dict(_COMMON, post_attention_norm="post_attention_layernorm",
              ffn_norm="pre_feedforward_layernorm", post_ffw_norm="post_feedforward_layernorm")
_TOP = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}


def hf_name(gguf_name: str, arch: str) -> str | None:
    """The Hugging Face name of a GGUF tensor (None for tensors HF does not keep,
    such as llama.cpp's precomputed rope_freqs)."""
    table = _GEMMA if arch.startswith("gemma") else _LLAMA
    m = _LAYER.match(gguf_name)
    if m:
        i, part, kind = m.groups()
        if part not in table:
            return None
        return f"model.layers.{i}.{table[part]}.{kind}"
    base, _, kind = gguf_name.rpartition(".")
    if base in _TOP and kind in ("weight", "bias"):
        return f"{_TOP[base]}.{kind}"
    return None


def _unpermute_rows(x: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation (convert_hf_to_gguf.py `permute`):
    rows of each head go from [pairs interleaved] back to [first half | second half]."""
    rows = x.shape[0]
    if rows % (2 * n_head):
        raise GGUFError(f"cannot un-permute {rows} rows over {n_head} heads")
    return (x.reshape(n_head, rows // n_head // 2, 2, *x.shape[1:])
            .swapaxes(1, 2).reshape(x.shape))


# ---------------------------------------------------------------- tensors

def _repack_native(raw: np.ndarray, ttype: int, shape):
    """Q4_0 / Q4_1 / Q8_0 blocks → MLX affine triplets (weight uint32, scales, biases
    as float16), exactly as mlx::core::load_gguf lays them out."""
    rows, cols = shape[0] if len(shape) > 1 else 1, shape[-1]
    nb = cols // 32
    if ttype == 8:      # Q8_0: f16 d, 32 x int8;  w = d*q = d*(q+128) - 128 d
        blk = raw.reshape(rows, nb, 34)
        d = blk[..., :2].copy().view(np.float16)[..., 0]
        q = blk[..., 2:].view(np.int8).astype(np.int16) + 128
        q = q.astype(np.uint8).reshape(rows, cols)
        packed = q.view(np.uint32).reshape(rows, cols // 4)   # 4 x 8 bit, low byte first
        scales = d
        biases = (d.astype(np.float32) * -128).astype(np.float16)
    else:
        bsz = 18 if ttype == 2 else 20
        blk = raw.reshape(rows, nb, bsz)
        d = blk[..., :2].copy().view(np.float16)[..., 0]
        if ttype == 2:  # Q4_0: w = d*(q-8)
            qs = blk[..., 2:]
            biases = (d.astype(np.float32) * -8).astype(np.float16)
        else:           # Q4_1: w = d*q + m
            qs = blk[..., 4:]
            biases = blk[..., 2:4].copy().view(np.float16)[..., 0]
        lo, hi = qs & 0x0F, qs >> 4            # element j = lo[j], j+16 = hi[j]
        q = np.concatenate([lo, hi], axis=-1).reshape(rows, cols).astype(np.uint32)
        q = q.reshape(rows, cols // 8, 8) << (np.arange(8, dtype=np.uint32) * 4)
        packed = np.bitwise_or.reduce(q, axis=-1).astype(np.uint32)
        scales = d
    lead = tuple(shape[:-1])
    return (packed.reshape(*lead, -1), scales.reshape(*lead, nb), biases.reshape(*lead, nb))


def _tensor_bytes(mm, header, name):
    t = header.tensors[name]
    if t["nbytes"] is None:
        raise GGUFError(f"{header.path}: tensor {name} has unsupported type "
                        f"{TYPE_NAMES.get(t['type'], t['type'])}")
    return mm[t["offset"]:t["offset"] + t["nbytes"]]


def _numpy_float(raw, t):
    if t["type"] == 30:
        return raw.view(np.uint16).reshape(t["shape"]), True
    return raw.view(_FLOAT_TYPES[t["type"]]).reshape(t["shape"]), False


def _dequant_simple(raw: np.ndarray, ttype: int, n: int) -> np.ndarray:
    """Vectorized Q4_0 / Q4_1 / Q5_0 / Q8_0 dequantization (ggml-quants.c
    dequantize_row_*), much faster than gguf.quants' chunked loop."""
    bs = _BLOCK[ttype][1]
    blk = raw.reshape(-1, bs)
    d = blk[:, :2].copy().view(np.float16).astype(np.float32)          # (nb, 1)
    if ttype == 8:
        q = blk[:, 2:].view(np.int8).astype(np.float32)
        return (d * q).reshape(n)
    if ttype == 2 or ttype == 3:
        qs = blk[:, 2:] if ttype == 2 else blk[:, 4:]
        q = np.concatenate([qs & 0x0F, qs >> 4], axis=1).astype(np.float32)
        if ttype == 2:
            return (d * (q - 8.0)).reshape(n)
        m = blk[:, 2:4].copy().view(np.float16).astype(np.float32)
        return (d * q + m).reshape(n)
    if ttype == 6:      # Q5_0: d, qh (32 high bits), qs (low nibbles)
        qh = blk[:, 2:6].copy().view(np.uint32)                          # (nb, 1)
        qs = blk[:, 6:]
        hb = ((qh >> np.arange(32, dtype=np.uint32)) & 1).astype(np.uint8) << 4
        q = np.concatenate([qs & 0x0F, qs >> 4], axis=1) | hb
        return (d * (q.astype(np.float32) - 16.0)).reshape(n)
    raise AssertionError(ttype)


def _dequantize(raw, t):
    shape = t["shape"]
    raw = raw.view(np.ndarray)          # a plain view: memmap slicing is slow
    n = int(np.prod(shape))
    if t["type"] in (2, 3, 6, 8):
        return _dequant_simple(raw, t["type"], n).reshape(shape)
    from gguf.quants import dequantize
    from gguf.constants import GGMLQuantizationType
    rows = n // shape[-1]
    out = dequantize(raw.reshape(rows, -1), GGMLQuantizationType(t["type"]))
    return np.asarray(out, dtype=np.float32).reshape(shape)


def load_gguf(path, dtype=None, dequantize: bool | None = None, native_reader: bool = True):
    """Read a GGUF file into (weights, config, quantization).

    weights: dict of Hugging Face names → mlxcy Arrays (quantized tensors as
    `<name>.weight/.scales/.biases`); config: a Hugging Face-style config dict;
    quantization: None, or {"group_size": 32, "bits": 4, "<hf module path>": {...}}
    in mlx-lm's per-layer form.

    Q4_0 / Q4_1 / Q8_0 stay quantized when every tensor of the file has a type MLX
    reads (as mlx::core::load_gguf does), unless `dequantize` is True or dtype is
    bfloat16: bf16 scales and biases lose too much (Q4_1 biases rounded to 8 bits
    moved SmolLM2's logits by 13%), so a bf16 request dequantizes.
    dtype: the float dtype of every float tensor (and of scales/biases, whose
    float16 values convert exactly to float32). Default: float32 for a file kept
    quantized (float32 scales are exact and MLX's CPU quantized matmul is fastest
    in float32), bfloat16 for a dequantized one.
    native_reader: use mlxcy.io.load_gguf (MLX's reader) for quantized files when
    it is built; otherwise a numpy repack that produces the same bits."""
    import mlxcy
    header = read_header(path)
    cfg = gguf_config(header)
    arch = header.architecture
    types = {t["type"] for t in header.tensors.values()}
    unknown = [n for n, t in header.tensors.items() if t["nbytes"] is None]
    if unknown:
        raise GGUFError(f"{path}: tensor {unknown[0]} has unsupported type "
                        f"{header.tensors[unknown[0]]['type']}")
    want = None if dtype is None else mlxcy.dtype(dtype)
    if want is not None and not want.is_floating:
        raise ValueError(f"{path}: dtype must be a float type, got {want}")
    if dequantize is None:
        native = types <= NATIVE_TYPES and want != mlxcy.bfloat16
    else:
        native = not dequantize
    if native and not types <= NATIVE_TYPES:
        raise GGUFError(f"{path}: types {sorted(TYPE_NAMES.get(t, t) for t in types - NATIVE_TYPES)}"
                        " cannot stay quantized; pass dequantize=True")
    if native and not types & {2, 3, 8}:
        native = False                     # nothing quantized: plain floats
    dtype = want if want is not None else (mlxcy.float32 if native else mlxcy.bfloat16)
    io = None
    if native and native_reader:
        try:
            from mlxcy import io
        except ImportError:
            io = None
    if io is not None and hasattr(io, "load_gguf"):
        return _load_native_io(io, path, header, cfg, dtype)
    n_head, n_kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    is_gemma = arch.startswith("gemma")
    weights: dict = {}
    quant_layers: dict = {}
    mm = np.memmap(path, dtype=np.uint8, mode="r")
    try:
        for gname, t in header.tensors.items():
            name = hf_name(gname, arch)
            if name is None:
                continue
            perm = None
            if arch == "llama" and name.endswith(("q_proj.weight", "k_proj.weight")):
                perm = n_head if ".q_proj." in name else n_kv
            raw = _tensor_bytes(mm, header, gname)
            if t["type"] in (2, 3, 8) and native:
                if len(t["shape"]) != 2:
                    raise GGUFError(f"{path}: quantized tensor {gname} is not 2-D")
                w, s, b = _repack_native(raw, t["type"], t["shape"])
                if perm:
                    w, s, b = (_unpermute_rows(x, perm) for x in (w, s, b))
                base = name[: -len(".weight")]
                weights[name] = mlxcy.array(np.ascontiguousarray(w))
                weights[base + ".scales"] = mlxcy.array(np.ascontiguousarray(s)).astype(dtype)
                weights[base + ".biases"] = mlxcy.array(np.ascontiguousarray(b)).astype(dtype)
                quant_layers[base] = {"group_size": 32, "bits": 8 if t["type"] == 8 else 4}
                continue
            if t["type"] in _FLOAT_TYPES or t["type"] == 30:
                x, is_bf16 = _numpy_float(raw, t)
                if is_gemma and name.endswith("norm.weight") or perm:
                    x = x.astype(np.float32) if not is_bf16 else \
                        (x.astype(np.uint32) << 16).view(np.float32)
                    is_bf16 = False
            else:
                x, is_bf16 = _dequantize(raw, t), False
            if perm:
                x = _unpermute_rows(x, perm)
            if is_gemma and name.endswith("norm.weight"):
                x = x - 1.0
            if is_bf16:
                a = mlxcy.array(np.ascontiguousarray(x)).view(mlxcy.bfloat16)
            else:
                a = mlxcy.array(np.ascontiguousarray(x))
            weights[name] = a if a.dtype == dtype else a.astype(dtype)
        from mlxcy import transforms
        transforms.eval(weights)           # lazy casts: release their sources now
    except BaseException:
        for a in weights.values():
            a.free()
        raise
    finally:
        del mm
    missing = [n for n in ("model.embed_tokens.weight", "model.norm.weight") if n not in weights]
    if missing:
        for a in weights.values():
            a.free()
        raise GGUFError(f"{path}: tensor {missing[0]} (GGUF "
                        f"{'token_embd' if 'embed' in missing[0] else 'output_norm'}.weight) is missing")
    return weights, cfg, _quant_summary(weights, quant_layers)


def _quant_summary(weights, quant_layers):
    """mlx-lm's quantization dict: the most common (bits, group) at the top,
    exceptions per layer path, and False for linear layers stored as floats."""
    quantization = None
    if quant_layers:
        counts = {}
        for q in quant_layers.values():
            counts[q["bits"]] = counts.get(q["bits"], 0) + 1
        bits = max(counts, key=counts.get)
        quantization = {"group_size": 32, "bits": bits, "mode": "affine"}
        for base, q in quant_layers.items():
            if q["bits"] != bits:
                quantization[base] = dict(q, mode="affine")
        for name in weights:      # linear layers stored as floats stay unquantized
            base = name[: -len(".weight")]
            if name.endswith((".weight")) and base not in quant_layers and \
                    base.endswith(("_proj", "embed_tokens", "lm_head")):
                quantization[base] = False
    return quantization


def _load_native_io(io, path, header, cfg, dtype):
    """Quantized GGUF through MLX's own reader (mlxcy.io.load_gguf)."""
    import mlxcy
    arch = header.architecture
    n_head, n_kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    try:
        raw, _meta = io.load_gguf(str(path))
    except Exception as e:
        msg = str(e)
        raise GGUFError(msg if str(path) in msg else f"{path}: {msg}") from e
    weights, quant_layers = {}, {}
    try:
        for gname in list(raw):
            a = raw.pop(gname)
            base, _, kind = gname.rpartition(".")
            if kind in ("scales", "biases"):
                name = hf_name(base + ".weight", arch)
                name = None if name is None else name[: -len("weight")] + kind
            else:
                name = hf_name(gname, arch)
            if name is None:
                a.free()
                continue
            perm = None
            if arch == "llama" and ".self_attn.q_proj." in name:
                perm = n_head
            elif arch == "llama" and ".self_attn.k_proj." in name:
                perm = n_kv
            if perm and name.endswith(".weight") or perm and kind in ("scales", "biases"):
                x = a.numpy() if a.dtype != mlxcy.bfloat16 else None
                if x is None:       # bf16 float tensor: permute through a uint16 view
                    x = a.view(mlxcy.uint16).numpy()
                    b = mlxcy.array(np.ascontiguousarray(_unpermute_rows(x, perm))).view(mlxcy.bfloat16)
                else:
                    b = mlxcy.array(np.ascontiguousarray(_unpermute_rows(x, perm)))
                a.free()
                a = b
            if name.endswith("norm.weight") and arch.startswith("gemma"):
                b = a.astype(mlxcy.float32) - 1.0
                a.free()
                a = b
            if a.dtype.is_floating and a.dtype != dtype:
                b = a.astype(dtype)
                a.free()
                a = b
            weights[name] = a
            if kind == "scales":
                w = raw.get(base + ".weight")
                hb = name[: -len(".scales")]
                if w is None and hb + ".weight" not in weights:
                    raise GGUFError(f"{path}: quantized tensor {base!r} has scales but no "
                                    f"{base + '.weight'!r}")
                wshape = (w.shape if w is not None else weights[hb + ".weight"].shape)
                bits = wshape[-1] * 32 // (a.shape[-1] * 32)
                quant_layers[hb] = {"group_size": 32, "bits": bits}
        from mlxcy import transforms
        transforms.eval(weights)           # read now: errors surface here, not later
    except BaseException:
        for x in list(weights.values()) + list(raw.values()):
            x.free()
        raise
    return weights, cfg, _quant_summary(weights, quant_layers)
