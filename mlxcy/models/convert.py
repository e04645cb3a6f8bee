"""Checkpoint conversion.

    convert_hf_to_mlx(src_dir, dst_dir, bits=4, group_size=64, dtype=None)
        Hugging Face safetensors → mlx-lm's quantized layout (config.json with
        "quantization" and "quantization_config"; model.safetensors with
        `<name>.weight` uint32, `.scales`, `.biases`; model.safetensors.index.json;
        tokenizer files copied). mlx_lm.load reads it, and we read mlx-lm's.

    convert_gguf_to_hf(gguf_path, dst_dir, dtype="float32", tokenizer=True)
        GGUF → Hugging Face layout (dequantized weights, config.json, and the
        tokenizer files derived from the GGUF: transformers' when installed,
        else mlxcy's own tokenizer.json).

    convert_gguf(gguf_path, dst_dir, bits=None, group_size=64, dtype=None)
        GGUF → Hugging Face layout, then quantized into mlx-lm's layout when
        bits is given (what `mlxcy convert model.gguf out --bits 4` runs).
"""
from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import numpy as np

__all__ = ["convert_hf_to_mlx", "convert_gguf_to_hf", "convert_gguf", "quantize_affine",
           "save_weights", "write_gguf_tokenizer"]

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                    "vocab.json", "merges.txt", "tokenizer.model", "added_tokens.json",
                    "generation_config.json", "chat_template.jinja", "chat_template.json")


def _dtype_name(d) -> str:
    return str(d).rsplit(".", 1)[-1]


def quantize_affine(w, group_size: int, bits: int, native: bool = True):
    """MLX affine quantization of a 2-D Array along its last axis: (w_q uint32,
    scales, biases) in w's dtype. Uses mlxcy.ops.quantize when built, else a numpy
    transcription of mlx::core's affine_quantize (bits 2, 4 or 8)."""
    import mlxcy.core as core
    from mlxcy import ops
    q = getattr(ops, "quantize", None) if native else None
    if q is not None:
        wq, s, b = q(w, group_size=group_size, bits=bits)
        return wq, s, b
    if 32 % bits:
        raise ValueError(f"the numpy quantizer packs 2, 4 or 8 bits, not {bits}")
    x = w.astype(core.float32).numpy()
    rows, cols = x.shape
    g = x.reshape(rows, cols // group_size, group_size)
    w_max, w_min = g.max(-1, keepdims=True), g.min(-1, keepdims=True)
    n_bins = np.float32((1 << bits) - 1)
    mask = np.abs(w_min) > np.abs(w_max)
    scales = np.maximum((w_max - w_min) / n_bins, np.float32(1e-7))
    scales = np.where(mask, scales, -scales)
    edge = np.where(mask, w_min, w_max)
    q0 = np.round(edge / scales)
    scales = np.where(q0 != 0, edge / np.where(q0 == 0, 1, q0), scales).astype(np.float32)
    biases = np.where(q0 == 0, 0, edge).astype(np.float32)
    qv = np.clip(np.round((g - biases) / scales), 0, n_bins).astype(np.uint32)
    per = 32 // bits
    qv = qv.reshape(rows, cols // per, per) << (np.arange(per, dtype=np.uint32) * bits)
    packed = np.bitwise_or.reduce(qv, axis=-1).astype(np.uint32)
    dt = w.dtype
    return (core.array(packed), core.array(scales[..., 0]).astype(dt),
            core.array(biases[..., 0]).astype(dt))


def save_weights(dst: Path, weights: dict, max_shard_bytes: int = 5 << 30,
                 metadata: dict | None = None) -> list[str]:
    """Write weights as mlx-lm does: model.safetensors (or model-0000i-of-0000n)
    plus model.safetensors.index.json. Returns the file names."""
    from mlxcy.models.load import save_safetensors
    shards, size = [], 0
    for k in weights:
        nb = int(weights[k].nbytes)
        if not shards or size + nb > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(k)
        size += nb
    n = len(shards)
    fmt = "model-{:05d}-of-{:05d}.safetensors" if n > 1 else "model.safetensors"
    index = {"metadata": {"total_size": sum(int(v.nbytes) for v in weights.values())},
             "weight_map": {}}
    names = []
    for i, keys in enumerate(shards):
        fn = fmt.format(i + 1, n)
        save_safetensors(dst / fn, {k: weights[k] for k in keys}, metadata or {"format": "mlx"})
        for k in keys:
            index["weight_map"][k] = fn
        names.append(fn)
    index["weight_map"] = dict(sorted(index["weight_map"].items()))
    with open(dst / "model.safetensors.index.json", "w") as f:
        json.dump(index, f, indent=4)
    return names


def _copy_tokenizer(src: Path, dst: Path) -> list[str]:
    copied = []
    for name in _TOKENIZER_FILES:
        p = src / name
        if p.is_file():
            shutil.copyfile(p, dst / name)
            copied.append(name)
    return copied


def _quantizable(name: str, a, group_size: int, paths: set) -> bool:
    """A linear or embedding weight of the family's spec (`paths`) whose rows
    split into groups."""
    if not name.endswith(".weight") or a.ndim != 2:
        return False
    return name[: -len(".weight")] in paths and a.shape[-1] % group_size == 0


def _legacy_rope_keys(cfg: dict) -> None:
    """transformers 5 writes rope_parameters (per layer type for gemma3) and no
    rope_theta; mlx-lm 0.32 reads rope_theta / rope_local_base_freq and would fall
    back to its defaults. Add the legacy keys when they are missing."""
    rp = cfg.get("rope_parameters")
    if not isinstance(rp, dict):
        return
    full = rp.get("full_attention", rp)
    if cfg.get("rope_theta") is None and isinstance(full, dict) and "rope_theta" in full:
        cfg["rope_theta"] = full["rope_theta"]
    local = rp.get("sliding_attention")
    if cfg.get("rope_local_base_freq") is None and isinstance(local, dict) \
            and "rope_theta" in local:
        cfg["rope_local_base_freq"] = local["rope_theta"]


def convert_hf_to_mlx(src_dir, dst_dir, bits: int = 4, group_size: int = 64, dtype=None,
                      max_shard_bytes: int = 5 << 30) -> Path:
    """Quantize a Hugging Face checkpoint directory into mlx-lm's layout."""
    import mlxcy.core as core
    from mlxcy.models.load import load_weights, parse_config, _free, LoadError
    src, dst = Path(src_dir), Path(dst_dir)
    if bits not in (2, 3, 4, 5, 6, 8):
        raise ValueError(f"bits must be one of 2, 3, 4, 5, 6, 8; got {bits}")
    if group_size not in (32, 64, 128):
        raise ValueError(f"group_size must be 32, 64 or 128; got {group_size}")
    if src.resolve() == dst.resolve():
        raise ValueError(f"{dst}: destination must differ from the source")
    weights, config, quantization = load_weights(src)
    out = {}
    try:
        if quantization:
            raise LoadError(f"{src / 'config.json'}: already quantized")
        if dtype is None:
            dname = config.get("torch_dtype") or config.get("dtype")
            dtype = core.dtype(dname) if dname in ("float16", "bfloat16", "float32") else None
        else:
            dtype = core.dtype(dtype)
        mc = parse_config(config, src / "config.json")
        paths = {m.path for m in mc.spec.modules(mc) if m.quantizable}
        from mlxcy import _progress
        bar = _progress.bar(total=len(weights), desc="quantizing", unit="tensor")
        for name in list(weights):
            bar.update(1)
            a = weights.pop(name)
            if mc.tie_word_embeddings and name == "lm_head.weight":
                a.free()
                continue
            if dtype is not None and a.dtype.is_floating and a.dtype != dtype:
                b = a.astype(dtype)
                a.free()
                a = b
            if _quantizable(name, a, group_size, paths):
                wq, s, b = quantize_affine(a, group_size, bits)
                a.free()
                base = name[: -len(".weight")]
                out[name], out[base + ".scales"], out[base + ".biases"] = wq, s, b
            else:
                out[name] = a
        bar.close()
        dst.mkdir(parents=True, exist_ok=True)
        cfg = copy.deepcopy(config)
        q = {"group_size": group_size, "bits": bits, "mode": "affine"}
        cfg["quantization"] = dict(q)
        cfg["quantization_config"] = dict(q)
        if dtype is not None:
            cfg["torch_dtype"] = _dtype_name(dtype)
        _legacy_rope_keys(cfg)
        save_weights(dst, out, max_shard_bytes)
        with open(dst / "config.json", "w") as f:
            json.dump(dict(sorted(cfg.items())), f, indent=4)
        _copy_tokenizer(src, dst)
    finally:
        _free(weights)
        _free(out)
    return dst


def convert_gguf_to_hf(gguf_path, dst_dir, dtype="float32", tokenizer: bool = True) -> Path:
    """Dequantize a GGUF file into a Hugging Face checkpoint directory
    (config.json + model.safetensors [+ tokenizer files])."""
    import mlxcy.core as core
    from mlxcy.models import gguf
    from mlxcy.models.load import _free
    src, dst = Path(gguf_path), Path(dst_dir)
    dtype = core.dtype(dtype)
    if _dtype_name(dtype) not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"dtype must be float32, bfloat16 or float16; got {dtype}")
    from mlxcy import _progress
    with _progress.spinner(f"reading {src.name}"):
        weights, cfg, _ = gguf.load_gguf(src, dtype=dtype, dequantize=True)
    try:
        dst.mkdir(parents=True, exist_ok=True)
        cfg = dict(cfg, torch_dtype=_dtype_name(dtype))
        save_weights(dst, weights, metadata={"format": "pt"})
    finally:
        _free(weights)
    with open(dst / "config.json", "w") as f:
        json.dump(cfg, f, indent=2)
    if tokenizer:
        write_gguf_tokenizer(src, dst)
    return dst


def convert_gguf(gguf_path, dst_dir, bits: int | None = None, group_size: int = 64,
                 dtype=None) -> Path:
    """GGUF → a model directory: Hugging Face layout (float tensors in dtype,
    default float32), or, with bits, mlx-lm's quantized layout (the GGUF is
    dequantized to float32 in a temporary directory beside dst, then quantized
    with bits / group_size; scales and float tensors in dtype, default float32)."""
    import tempfile
    src, dst = Path(gguf_path), Path(dst_dir)
    if bits is None:
        return convert_gguf_to_hf(src, dst, dtype=dtype or "float32")
    if bits not in (2, 3, 4, 5, 6, 8):
        raise ValueError(f"bits must be one of 2, 3, 4, 5, 6, 8; got {bits}")
    if group_size not in (32, 64, 128):
        raise ValueError(f"group_size must be 32, 64 or 128; got {group_size}")
    tmp_parent = dst.absolute().parent
    tmp_parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".mlxcy-convert-", dir=tmp_parent) as tmp:
        convert_gguf_to_hf(src, tmp, dtype="float32")
        return convert_hf_to_mlx(tmp, dst, bits=bits, group_size=group_size, dtype=dtype)


def write_gguf_tokenizer(src, dst) -> str:
    """Write the GGUF file's tokenizer into directory dst: transformers'
    tokenizer files when transformers reads this GGUF, else mlxcy's own
    tokenizer.json (the spec mlxcy.tokenizer derives from the metadata) and a
    tokenizer_config.json with the special tokens and chat template.
    Returns "transformers" or "mlxcy"."""
    src, dst = Path(src), Path(dst)
    try:
        from transformers import AutoTokenizer
        tok = AutoTokenizer.from_pretrained(str(src.parent), gguf_file=src.name)
        tok.save_pretrained(str(dst))
        return "transformers"
    except Exception:       # not installed, or an architecture it cannot read
        pass
    from mlxcy.tokenizer import Tokenizer
    from mlxcy.tokenizer.loader import gguf_spec
    spec, meta = gguf_spec(src)
    spec = dict(spec)
    if spec.get("id_to_token") is None:
        spec.pop("id_to_token", None)
    spec.setdefault("version", "1.0")
    with open(dst / "tokenizer.json", "w", encoding="utf-8") as f:
        json.dump(spec, f, ensure_ascii=False)
    tok = Tokenizer.load(src)

    def text(i):
        return tok.id_to_token(i) if isinstance(i, int) else i

    cfg = {"bos_token": text(meta.bos), "eos_token": text(meta.eos[0]) if meta.eos else None,
           "pad_token": text(meta.pad), "unk_token": text(meta.unk),
           "add_bos_token": bool(meta.add_bos), "add_eos_token": bool(meta.add_eos)}
    if meta.chat_template:
        cfg["chat_template"] = meta.chat_template
    with open(dst / "tokenizer_config.json", "w", encoding="utf-8") as f:
        json.dump({k: v for k, v in cfg.items() if v is not None}, f, indent=2,
                  ensure_ascii=False)
    return "mlxcy"
