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
           "NATIVE_TYPES", "REPACK_TYPES", "TYPE_NAMES"]


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


# Types repacked into MLX's affine layout (group 32) for mlxcy's CPU kernels:
# Q5_0/Q5_1/Q5_K -> 5 bits, Q4_K -> 4 bits (exactly: per 32 values one scale
# and one bias, products of float16 and 6-bit integers, exact in float32),
# Q6_K -> 8 bits re-quantized (its scales change every 16 values, which
# MLX's group sizes of 32 or more cannot hold: error <= 1/510 of a group's range).
REPACK_TYPES = {6: 5, 7: 5, 12: 4, 13: 5, 14: 8}
REPACK_EXACT = {6, 7, 12, 13}


def _pack_bits(q: np.ndarray, bits: int) -> np.ndarray:
    """[rows, cols] values < 2**bits -> MLX's packing (one little-endian bit
    stream per row, in uint32 words): eight values fill `bits` bytes."""
    rows, cols = q.shape
    out = np.empty((rows, cols * bits // 8), np.uint8)
    shifts = np.arange(8, dtype=np.uint64) * np.uint64(bits)
    for r0 in range(0, rows, 1024):            # bounded temporaries for big tables
        g = q[r0:r0 + 1024].reshape(-1, cols // 8, 8).astype(np.uint64) << shifts
        v = np.bitwise_or.reduce(g, axis=-1)                       # [r, cols/8] uint64
        out[r0:r0 + 1024] = v.view(np.uint8).reshape(-1, cols // 8, 8)[..., :bits].reshape(
            -1, cols * bits // 8)
    return out.view(np.uint32)


def _k_scales_mins(sc: np.ndarray):
    """The 6-bit scales and mins of Q4_K/Q5_K's 8 sub-blocks from their 12
    packed bytes (ggml-quants.c get_scale_min_k4): [nb, 8] each."""
    sc = sc.astype(np.uint8)
    d = np.empty(sc.shape[:-1] + (8,), np.uint8)
    m = np.empty_like(d)
    d[..., :4] = sc[..., 0:4] & 63
    m[..., :4] = sc[..., 4:8] & 63
    d[..., 4:] = (sc[..., 8:12] & 0x0F) | ((sc[..., 0:4] >> 6) << 4)
    m[..., 4:] = (sc[..., 8:12] >> 4) | ((sc[..., 4:8] >> 6) << 4)
    return d, m


def _f16(b: np.ndarray) -> np.ndarray:
    """Little-endian float16 at the first two bytes of each block, as float32."""
    return b[..., :2].copy().view(np.float16)[..., 0].astype(np.float32)


def _repack_kquant(raw: np.ndarray, ttype: int, shape, chunk_rows: int = 2048):
    """Q5_0 / Q5_1 / Q4_K / Q5_K / Q6_K blocks -> (packed uint32, scales,
    biases as float32 [rows, cols/32], bits) in MLX's affine layout, group 32,
    w = scale * q + bias (ggml-quants.c dequantize_row_* for the block layouts).
    Rows are repacked chunk_rows at a time: the temporaries of a whole
    152k-row embedding took the load's peak memory past 1.6 GB."""
    rows, cols = shape[0] if len(shape) > 1 else 1, shape[-1]
    if rows <= chunk_rows:
        return _repack_rows(raw, ttype, rows, cols)
    by_row = raw.view(np.uint8).reshape(rows, -1)
    parts = [_repack_rows(by_row[r:r + chunk_rows], ttype, min(chunk_rows, rows - r), cols)
             for r in range(0, rows, chunk_rows)]
    return tuple(np.concatenate([p[i] for p in parts]) for i in range(3)) + (parts[0][3],)


def _repack_rows(raw: np.ndarray, ttype: int, rows: int, cols: int):
    vals, bsz = _BLOCK[ttype]
    blk = raw.view(np.uint8).reshape(rows, cols // vals, bsz)
    nb = cols // vals
    if ttype in (6, 7):                   # Q5_0: d, qh, qs;  Q5_1: d, m, qh, qs
        d = _f16(blk)
        o = 2 if ttype == 6 else 4
        qh = blk[..., o:o + 4].copy().view(np.uint32)               # [rows, nb, 1]
        qs = blk[..., o + 4:]
        hb = (((qh >> np.arange(32, dtype=np.uint32)) & 1) << 4).astype(np.uint8)
        q = np.concatenate([qs & 0x0F, qs >> 4], axis=-1) | hb      # [rows, nb, 32]
        scales = d
        biases = -16.0 * d if ttype == 6 else _f16(blk[..., 2:4])
        bits = 5
    elif ttype in (12, 13):               # Q4_K: d, dmin, scales[12], qs[128];  Q5_K: + qh[32]
        d, dmin = _f16(blk), _f16(blk[..., 2:4])
        sc, mn = _k_scales_mins(blk[..., 4:16])                     # [rows, nb, 8]
        if ttype == 12:
            qs = blk[..., 16:].reshape(rows, nb, 4, 32)
            qh = None
        else:
            qh = blk[..., 16:48]                                    # [rows, nb, 32]
            qs = blk[..., 48:].reshape(rows, nb, 4, 32)
        # chunk j of 32 bytes: sub-block 2j = low nibbles, 2j + 1 = high nibbles
        q = np.stack([qs & 0x0F, qs >> 4], axis=3).reshape(rows, nb, 8, 32)
        if qh is not None:
            hb = ((qh[:, :, None, :] >> np.arange(8, dtype=np.uint8)[None, None, :, None]) & 1)
            q = q | (hb << 4)
        scales = d[..., None] * sc.astype(np.float32)               # exact in float32
        biases = -(dmin[..., None] * mn.astype(np.float32))
        bits = 4 if ttype == 12 else 5
    elif ttype == 14:                     # Q6_K: ql[128], qh[64], scales[16] int8, d
        ql = blk[..., :128].reshape(rows, nb, 2, 64)
        qh = blk[..., 128:192].reshape(rows, nb, 2, 32)
        sc = blk[..., 192:208].view(np.int8).astype(np.float32).reshape(rows, nb, 16)
        d = _f16(blk[..., 208:210])
        lo = np.stack([ql[..., :32] & 0x0F, ql[..., 32:] & 0x0F, ql[..., :32] >> 4,
                       ql[..., 32:] >> 4], axis=3)                  # [rows, nb, 2, 4, 32]
        hi = np.stack([(qh >> 0) & 3, (qh >> 2) & 3, (qh >> 4) & 3, (qh >> 6) & 3], axis=3)
        q6 = (lo | (hi << 4)).astype(np.float32) - 32.0             # [rows, nb, 2, 4, 32]
        w = q6.reshape(rows, nb, 16, 16) * (d[..., None, None] * sc[..., None])
        w = w.reshape(rows, cols // 32, 32)
        lo_, hi_ = w.min(-1), w.max(-1)
        scales = ((hi_ - lo_) / 255.0).astype(np.float32)
        safe = np.where(scales > 0, scales, 1.0)
        q = np.clip(np.rint((w - lo_[..., None]) / safe[..., None]), 0, 255).astype(np.uint8)
        biases = lo_.astype(np.float32)
        return (_pack_bits(q.reshape(rows, cols), 8), scales, biases, 8)
    else:
        raise AssertionError(ttype)
    q = q.reshape(rows, cols).astype(np.uint8)
    return (_pack_bits(q, bits), scales.reshape(rows, cols // 32).astype(np.float32),
            biases.reshape(rows, cols // 32).astype(np.float32), bits)


def _half_scales(name, dtype):
    """Scales and biases of quantized linear layers stay float16 when loading
    float32 for the CPU: GGUF stores Q4_0/Q4_1/Q8_0's as float16 (exact), and
    mlxcy.cpu_kernels read them with F16C, a sixth less weight traffic per
    4-bit token than float32.  Embeddings keep `dtype` (their rows set the
    activations' dtype)."""
    import mlxcy.core as core
    from mlxcy.device import default_device
    return (dtype == core.float32 and default_device().type == "cpu"
            and name.endswith((".scales", ".biases")) and "embed_tokens" not in name)


def _exact_half(a):
    """a as float16 if that is exact (finite, same values), else None."""
    import mlxcy.core as core
    h = a.astype(core.float16)
    x = np.asarray(a.astype(core.float32))
    return h if np.array_equal(np.asarray(h.astype(core.float32)), x) else None


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
    K-quant files (Q4_K, Q5_K, Q6_K, Q5_0, Q5_1 beside those) are repacked into
    MLX's affine layout (REPACK_TYPES: 4, 5 or 8 bits, group 32, float32 scales;
    exact except Q6_K, re-quantized to 8 bits) when loading for the CPU, where
    mlxcy.cpu_kernels run every width; on other devices, by default, they
    dequantize to bfloat16 (`dequantize=False` repacks them anywhere).
    dtype: the float dtype of every float tensor (and of scales/biases, whose
    float16 values convert exactly to float32). Default: float32 for a file kept
    quantized (float32 scales are exact and MLX's CPU quantized matmul is fastest
    in float32), bfloat16 for a dequantized one.  Loading float32 for the CPU,
    quantized linear layers keep float16 scales/biases where that is exact
    (_half_scales: less weight traffic for mlxcy.cpu_kernels).
    native_reader: use mlxcy.io.load_gguf (MLX's reader) for quantized files when
    it is built; otherwise a numpy repack that produces the same bits."""
    import mlxcy.core as core
    from mlxcy.device import default_device
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
    keep = NATIVE_TYPES | set(REPACK_TYPES)
    if dequantize is None:
        native = want != core.bfloat16 and (
            types <= NATIVE_TYPES or (types <= keep and default_device().type == "cpu"))
    else:
        native = not dequantize
    if native and not types <= keep:
        raise GGUFError(f"{path}: types {sorted(TYPE_NAMES.get(t, t) for t in types - keep)}"
                        " cannot stay quantized; pass dequantize=True")
    if native and not types & ({2, 3, 8} | set(REPACK_TYPES)):
        native = False                     # nothing quantized: plain floats
    if types & set(REPACK_TYPES):
        native_reader = False              # MLX's reader cannot read K-quants
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
                sd = core.float16 if _half_scales(base + ".scales", dtype) else dtype
                weights[base + ".scales"] = core.array(np.ascontiguousarray(s)).astype(sd)
                weights[base + ".biases"] = core.array(np.ascontiguousarray(b)).astype(sd)
                quant_layers[base] = {"group_size": 32, "bits": 8 if t["type"] == 8 else 4}
                continue
            if t["type"] in REPACK_TYPES and native:
                if len(t["shape"]) != 2:
                    raise GGUFError(f"{path}: quantized tensor {gname} is not 2-D")
                w, s, b, bits = _repack_kquant(raw, t["type"], t["shape"])
                if perm:
                    w, s, b = (_unpermute_rows(x, perm) for x in (w, s, b))
                base = name[: -len(".weight")]
                weights[name] = core.array(np.ascontiguousarray(w))
                sd = core.float32 if dtype != core.float64 else dtype   # exact products
                for kind, x in (("scales", s), ("biases", b)):
                    a = core.array(np.ascontiguousarray(x)).astype(sd)
                    h = _exact_half(a) if _half_scales(f"{base}.{kind}", dtype) else None
                    weights[f"{base}.{kind}"] = a if h is None else h
                if weights[base + ".scales"].dtype != weights[base + ".biases"].dtype:
                    weights[base + ".scales"] = weights[base + ".scales"].astype(sd)
                    weights[base + ".biases"] = weights[base + ".biases"].astype(sd)
                quant_layers[base] = {"group_size": 32, "bits": bits}
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
            want_t = core.float16 if (kind in ("scales", "biases") and a.dtype == core.float16
                                      and _half_scales(name, dtype)) else dtype
            if a.dtype.is_floating and a.dtype != want_t:
                b = a.astype(want_t)
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
