"""GGUF files → Hugging Face-named weights and a Hugging Face-style config dict.

- `read_header(path)`: mlxcy.gguf_reader's checked parser of the GGUF header
  (metadata and tensor table), the one every GGUF reader of mlxcy goes through.
- `load_gguf(path, dtype=None)`: the weights. Files whose tensors are all F32, F16,
  BF16, Q4_0, Q4_1 or Q8_0 keep their quantization (MLX's affine layout:
  `<name>.weight` uint32 packed, `<name>.scales`, `<name>.biases`); others (Q4_K,
  Q5_0, Q6_K ...) are dequantized with `gguf.quants.dequantize` to `dtype`.

Names, metadata keys and value quirks are the family's (its ArchSpec in
mlxcy/models/families/): `blk.N.attn_q` → `model.layers.N.self_attn.q_proj`
and so on, llama's q/k rows un-permuted (llama.cpp permuted them for its
interleaved RoPE; also on quantized triplets: a row permutation applies to
weight, scales, biases), Gemma's (1 + w) norms stored back as w.
"""
from __future__ import annotations

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

def _spec(header):
    from mlxcy.models.families import spec_for_gguf
    return spec_for_gguf(header.architecture, header.path)


def gguf_config(header: GGUFHeader) -> dict:
    """A Hugging Face-style config dict from GGUF metadata (plus the values
    the family's GGUF files leave out), validated by the family's spec:
    GGUFError naming the file and the metadata key."""
    check_model_metadata(header)        # sizes typed, bounded, and agreeing with the tensors
    spec = _spec(header)
    cfg = spec.gguf_config(header.architecture, header.metadata, header.tensors, header.path)
    parse_gguf_config(cfg, header.path, header.architecture)
    return cfg


def parse_gguf_config(cfg: dict, path, arch=None):
    """The ModelConfig of a config dict made from a GGUF file (GGUFError
    naming the GGUF metadata key the faulty value came from)."""
    from mlxcy.models.config import ModelConfig
    from mlxcy.models.families import spec_for
    from mlxcy.models.spec import ConfigError
    try:
        return ModelConfig.from_dict(cfg)
    except ConfigError as e:
        msg = str(e)
        spec = spec_for(cfg["model_type"])
        arch = arch or (spec.gguf_architectures or ("?",))[0]
        keys = [spec.gguf_key(arch, k) for k in spec.gguf_keys
                if f"'{k}'" in msg or f"{k} (" in msg]
        hint = f" (GGUF metadata {', '.join(keys)})" if keys else ""
        raise GGUFError(f"{path}: {msg}{hint}") from None


# ---------------------------------------------------------------- names

def hf_name(gguf_name: str, arch: str) -> str | None:
    """The Hugging Face name of a GGUF tensor of architecture `arch` (None for
    tensors HF does not keep, such as llama.cpp's precomputed rope_freqs)."""
    from mlxcy.models.families import spec_for_gguf
    return spec_for_gguf(arch).hf_name(gguf_name)


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


def _check_header(header, spec, cfg):
    """Every tensor the config needs, present with its shape in the GGUF
    tensor table: checked before any tensor is read (LoadError naming the
    file, the tensor and the config keys)."""
    from mlxcy.models.check import check_tensors
    infos = {}
    for gname, t in header.tensors.items():
        name = spec.hf_name(gname)
        if name is not None:
            infos[name] = (t["shape"], TYPE_NAMES.get(t["type"], "?"))
    check_tensors(infos, parse_gguf_config(cfg, header.path, header.architecture), None,
                  lambda name: header.path, dtypes=False)


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
    import mlxcy.core as core
    header = read_header(path)
    cfg = gguf_config(header)
    spec = _spec(header)
    _check_header(header, spec, cfg)
    types = {t["type"] for t in header.tensors.values()}
    unknown = [n for n, t in header.tensors.items() if t["nbytes"] is None]
    if unknown:
        raise GGUFError(f"{path}: tensor {unknown[0]} has unsupported type "
                        f"{header.tensors[unknown[0]]['type']}")
    want = None if dtype is None else core.dtype(dtype)
    if want is not None and not want.is_floating:
        raise ValueError(f"{path}: dtype must be a float type, got {want}")
    if dequantize is None:
        native = types <= NATIVE_TYPES and want != core.bfloat16
    else:
        native = not dequantize
    if native and not types <= NATIVE_TYPES:
        raise GGUFError(f"{path}: types {sorted(TYPE_NAMES.get(t, t) for t in types - NATIVE_TYPES)}"
                        " cannot stay quantized; pass dequantize=True")
    if native and not types & {2, 3, 8}:
        native = False                     # nothing quantized: plain floats
    dtype = want if want is not None else (core.float32 if native else core.bfloat16)
    io = None
    if native and native_reader:
        try:
            from mlxcy import io
        except ImportError:
            io = None
    if io is not None and hasattr(io, "load_gguf"):
        return _load_native_io(io, path, header, cfg, dtype, spec)
    weights: dict = {}
    quant_layers: dict = {}
    mm = np.memmap(path, dtype=np.uint8, mode="r")
    try:
        for gname, t in header.tensors.items():
            name = spec.hf_name(gname)
            if name is None:
                continue
            perm = spec.gguf_permute_heads(name, cfg) if name.endswith(".weight") else None
            plus_one = spec.gguf_plus_one(name)
            raw = _tensor_bytes(mm, header, gname)
            if t["type"] in (2, 3, 8) and native:
                if len(t["shape"]) != 2:
                    raise GGUFError(f"{path}: quantized tensor {gname} is not 2-D")
                w, s, b = _repack_native(raw, t["type"], t["shape"])
                if perm:
                    w, s, b = (_unpermute_rows(x, perm) for x in (w, s, b))
                base = name[: -len(".weight")]
                weights[name] = core.array(np.ascontiguousarray(w))
                weights[base + ".scales"] = core.array(np.ascontiguousarray(s)).astype(dtype)
                weights[base + ".biases"] = core.array(np.ascontiguousarray(b)).astype(dtype)
                quant_layers[base] = {"group_size": 32, "bits": 8 if t["type"] == 8 else 4}
                continue
            if t["type"] in _FLOAT_TYPES or t["type"] == 30:
                x, is_bf16 = _numpy_float(raw, t)
                if plus_one or perm:
                    x = x.astype(np.float32) if not is_bf16 else \
                        (x.astype(np.uint32) << 16).view(np.float32)
                    is_bf16 = False
            else:
                x, is_bf16 = _dequantize(raw, t), False
            if perm:
                x = _unpermute_rows(x, perm)
            if plus_one:
                x = x - 1.0
            if is_bf16:
                a = core.array(np.ascontiguousarray(x)).view(core.bfloat16)
            else:
                a = core.array(np.ascontiguousarray(x))
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


def _load_native_io(io, path, header, cfg, dtype, spec):
    """Quantized GGUF through MLX's own reader (mlxcy.io.load_gguf)."""
    import mlxcy.core as core
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
                name = spec.hf_name(base + ".weight")
                name = None if name is None else name[: -len("weight")] + kind
            else:
                name = spec.hf_name(gname)
            if name is None:
                a.free()
                continue
            perm = spec.gguf_permute_heads(name, cfg)
            if perm and name.endswith(".weight") or perm and kind in ("scales", "biases"):
                x = a.numpy() if a.dtype != core.bfloat16 else None
                if x is None:       # bf16 float tensor: permute through a uint16 view
                    x = a.view(core.uint16).numpy()
                    b = core.array(np.ascontiguousarray(_unpermute_rows(x, perm))).view(core.bfloat16)
                else:
                    b = core.array(np.ascontiguousarray(_unpermute_rows(x, perm)))
                a.free()
                a = b
            if spec.gguf_plus_one(name):
                b = a.astype(core.float32) - 1.0
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
