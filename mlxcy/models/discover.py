"""Find checkpoints under a folder and describe them without loading weights.

    for m in discover("~/models"): print(m["path"], m["architecture"], m["quantization"])

Each entry: path, format ("hf", "mlx" for mlx-lm's quantized layout, "gguf"),
architecture (model_type), vocab_size, num_layers, hidden_size, num_heads,
num_kv_heads, head_dim, context_length, dtype, quantization (None,
{"bits", "group_size"} or for GGUF {"file_type", "types": {type: count}}),
size_bytes, and error (set instead of the fields when a candidate is unreadable).
Only config.json, safetensors headers and GGUF headers are read.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

__all__ = ["discover", "describe"]

_SKIP_DIRS = {".git", "__pycache__", "node_modules", ".venv", "venv"}


def _from_config(cfg: dict) -> dict:
    tc = cfg.get("text_config") if isinstance(cfg.get("text_config"), dict) else {}
    c = dict(cfg, **tc) if tc else cfg      # text values win over the wrapper's
    h = c.get("hidden_size")
    nh = c.get("num_attention_heads")
    return {
        "architecture": cfg.get("model_type"),
        "vocab_size": c.get("vocab_size"),
        "num_layers": c.get("num_hidden_layers"),
        "hidden_size": h,
        "num_heads": nh,
        "num_kv_heads": c.get("num_key_value_heads", nh),
        "head_dim": c.get("head_dim") or (h // nh if h and nh else None),
        "context_length": c.get("max_position_embeddings"),
        "tie_word_embeddings": c.get("tie_word_embeddings"),
    }


def _dir_entry(d: Path) -> dict:
    from mlxcy.models.load import safetensors_header, _weight_files
    with open(d / "config.json") as f:
        cfg = json.load(f)
    if not isinstance(cfg, dict):
        raise ValueError(f"{d / 'config.json'}: expected a JSON object")
    e = {"path": str(d), "name": d.name}
    e.update(_from_config(cfg))
    q = cfg.get("quantization")
    e["format"] = "mlx" if q else "hf"
    e["quantization"] = ({"bits": q.get("bits"), "group_size": q.get("group_size"),
                          "mode": q.get("mode", "affine")} if q else None)
    files, _ = _weight_files(d)
    size, dtypes = 0, {}
    for fp in files:
        size += fp.stat().st_size
        header, _, _ = safetensors_header(fp)
        for info in header.values():
            dtypes[info["dtype"]] = dtypes.get(info["dtype"], 0) + 1
    e["size_bytes"] = size
    floats = {k: v for k, v in dtypes.items() if k in ("F32", "F16", "BF16", "F64")}
    names = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64"}
    e["dtype"] = (names[max(floats, key=floats.get)] if floats
                  else cfg.get("torch_dtype") or cfg.get("dtype"))
    e["tokenizer"] = (d / "tokenizer.json").is_file() or (d / "tokenizer.model").is_file()
    return e


def _gguf_entry(p: Path) -> dict:
    from mlxcy.models import gguf
    h = gguf.read_header(p)
    e = {"path": str(p), "name": p.name, "format": "gguf", "size_bytes": h.size}
    try:
        e.update(_from_config(gguf.gguf_config(h)))
    except gguf.GGUFError as err:     # an architecture we cannot run: still listed
        arch = h.architecture
        m = h.metadata
        e.update({"architecture": arch, "vocab_size": None,
                  "num_layers": m.get(f"{arch}.block_count"),
                  "hidden_size": m.get(f"{arch}.embedding_length"),
                  "num_heads": m.get(f"{arch}.attention.head_count"),
                  "num_kv_heads": m.get(f"{arch}.attention.head_count_kv"),
                  "head_dim": m.get(f"{arch}.attention.key_length"),
                  "context_length": m.get(f"{arch}.context_length"),
                  "supported": False, "reason": str(err)})
    e["name"] = h.metadata.get("general.name", p.stem)
    types = h.type_counts()
    e["quantization"] = {"file_type": h.metadata.get("general.file_type"), "types": types}
    floats = {k: v for k, v in types.items() if k in ("F32", "F16", "BF16")}
    quant = {k: v for k, v in types.items() if k not in floats}
    e["dtype"] = max(quant, key=quant.get) if quant else max(floats, key=floats.get)
    e["tokenizer"] = "tokenizer.ggml.tokens" in h.metadata
    return e


def describe(path) -> dict:
    """Metadata of one checkpoint (directory with config.json, or .gguf file)."""
    p = Path(path)
    if p.is_dir():
        return _dir_entry(p)
    return _gguf_entry(p)


def discover(base_dir, recursive: bool = True, max_depth: int = 4) -> list[dict]:
    """Checkpoints under base_dir: directories holding config.json with
    safetensors weights, and .gguf files. Unreadable candidates are listed with
    an "error" key rather than raising. Sorted by path."""
    base = Path(base_dir).expanduser()
    if not base.is_dir():
        raise FileNotFoundError(f"{base}: not a directory")
    out = []
    base_depth = len(base.parts)
    for root, dirs, files in os.walk(base):
        rp = Path(root)
        depth = len(rp.parts) - base_depth
        dirs[:] = sorted(d for d in dirs if d not in _SKIP_DIRS and not d.startswith("."))
        if not recursive or depth >= max_depth:
            dirs[:] = []
        if "config.json" in files and any(f.endswith(".safetensors") for f in files):
            try:
                out.append(_dir_entry(rp))
            except Exception as err:
                out.append({"path": str(rp), "name": rp.name, "format": "hf",
                            "error": f"{type(err).__name__}: {err}"})
        for f in sorted(files):
            if f.lower().endswith(".gguf"):
                fp = rp / f
                try:
                    out.append(_gguf_entry(fp))
                except Exception as err:
                    out.append({"path": str(fp), "name": f, "format": "gguf",
                                "error": f"{type(err).__name__}: {err}"})
    return sorted(out, key=lambda e: e["path"])
