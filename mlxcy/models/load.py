"""Loading checkpoints: Hugging Face / MLX-quantized directories and GGUF files.

    model = load_model(path, dtype=None)          # a directory or a .gguf file
    model, source = load(path)                    # source: where the tokenizer lives
    config = load_config(path)                    # config dict only (no weights)
    weights, config, quantization = load_weights(path, dtype=None)

A directory holds config.json and model.safetensors or a sharded
model.safetensors.index.json (or several model*.safetensors, as mlx-lm reads).
A config with a "quantization" entry is mlx-lm's quantized layout
(`<name>.weight` uint32, `<name>.scales`, `<name>.biases`).

Every error names the file and the tensor or key; Arrays already loaded are freed
before raising.
"""
from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import numpy as np

__all__ = ["LoadError", "load", "load_model", "load_config", "load_weights",
           "read_safetensors", "save_safetensors", "safetensors_header",
           "expected_shapes", "SUPPORTED_MODEL_TYPES"]


from mlxcy.errors import LoadError  # noqa: E402,F401  (re-exported)


SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "qwen3", "gemma3_text", "gemma3")

# ---------------------------------------------------------------- safetensors

_ST_DTYPES = {"F64": (np.float64, "float64"), "F32": (np.float32, "float32"),
              "F16": (np.float16, "float16"), "BF16": (np.uint16, "bfloat16"),
              "I64": (np.int64, "int64"), "I32": (np.int32, "int32"),
              "I16": (np.int16, "int16"), "I8": (np.int8, "int8"),
              "U64": (np.uint64, "uint64"), "U32": (np.uint32, "uint32"),
              "U16": (np.uint16, "uint16"), "U8": (np.uint8, "uint8"),
              "BOOL": (np.bool_, "bool")}
_ST_NAMES = {"float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16",
             "int64": "I64", "int32": "I32", "int16": "I16", "int8": "I8",
             "uint64": "U64", "uint32": "U32", "uint16": "U16", "uint8": "U8", "bool": "BOOL"}


def safetensors_header(path) -> tuple[dict, dict, int]:
    """(tensors, metadata, data_start) of a .safetensors file, checked by
    mlxcy.safetensors_header (sizes, offsets, dtypes, shapes; LoadError naming
    the file and tensor); tensors: name -> {"dtype", "shape", "data_offsets"}."""
    from mlxcy.errors import ModelFormatError
    from mlxcy.safetensors_header import read_header
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: safetensors file not found")
    try:
        tensors, meta, start = read_header(path)
    except ModelFormatError as e:
        raise LoadError(str(e)) from None
    header = {name: {"dtype": t["dtype"], "shape": list(t["shape"]),
                     "data_offsets": [t["begin"], t["end"]]} for name, t in tensors.items()}
    return header, meta, start


def read_safetensors(path, names=None, native: bool | None = None) -> tuple[dict, dict]:
    """Read a .safetensors file into ({name: Array}, metadata). bf16 stays bf16.
    The header is validated first (truncation, sizes); the data comes from MLX's
    reader (mlxcy.io.load_safetensors) when built, else from a numpy memmap.
    `names`: keep only these tensors."""
    header, meta, start = safetensors_header(path)
    io = _native_io() if native is not False else None
    if io is not None and hasattr(io, "load_safetensors"):
        try:
            out, meta2 = io.load_safetensors(str(path))
        except Exception as e:
            msg = str(e)
            raise LoadError(msg if str(path) in msg else f"{path}: {msg}") from e
        if names is not None:
            for k in [k for k in out if k not in names]:
                out.pop(k).free()
        return out, dict(meta2 or meta)
    return _read_safetensors_numpy(path, header, meta, start, names)


def _native_io():
    try:
        from mlxcy import io
        return io
    except ImportError:
        return None


def _read_safetensors_numpy(path, header, meta, start, names):
    import mlxcy
    out = {}
    mm = np.memmap(path, dtype=np.uint8, mode="r") if header else None
    try:
        for name, info in header.items():
            if names is not None and name not in names:
                continue
            npd, mlxname = _ST_DTYPES[info["dtype"]]
            b, e = info["data_offsets"]
            x = mm[start + b:start + e].view(np.ndarray).view(npd).reshape(info["shape"])
            a = mlxcy.array(x)
            if mlxname == "bfloat16":
                a = a.view(mlxcy.bfloat16)
            out[name] = a
    except BaseException:
        _free(out)
        raise
    finally:
        del mm
    return out, meta


def _to_numpy_bytes(a) -> tuple[np.ndarray, str]:
    import mlxcy
    name = str(a.dtype).rsplit(".", 1)[-1]
    if name not in _ST_NAMES:
        raise LoadError(f"cannot save dtype {a.dtype} to safetensors")
    x = a.view(mlxcy.uint16).numpy() if name == "bfloat16" else a.numpy()
    return np.ascontiguousarray(x), _ST_NAMES[name]


def save_safetensors(path, tensors: dict, metadata: dict | None = None,
                     native: bool | None = None) -> None:
    """Write {name: Array} to a .safetensors file (atomically: tmp + rename),
    through MLX's writer (mlxcy.io.save_safetensors) when built."""
    path = Path(path)
    io = _native_io() if native is not False else None
    if io is not None and hasattr(io, "save_safetensors"):
        tmp = path.with_name(path.name + f".tmp{os.getpid()}.safetensors")
        try:
            io.save_safetensors(str(tmp), tensors,
                                {str(k): str(v) for k, v in (metadata or {}).items()})
            os.replace(tmp, path)
        except BaseException:
            if tmp.exists():
                tmp.unlink()
            raise
        return
    header = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    offset = 0
    names = sorted(tensors)
    infos = []
    for name in names:
        a = tensors[name]
        nbytes = int(a.nbytes)
        dt = _ST_NAMES.get(str(a.dtype).rsplit(".", 1)[-1])
        if dt is None:
            raise LoadError(f"{path}: tensor {name}: cannot save dtype {a.dtype}")
        header[name] = {"dtype": dt, "shape": list(a.shape),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    hb = json.dumps(header, separators=(",", ":")).encode()
    hb += b" " * (-len(hb) % 8)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(struct.pack("<Q", len(hb)))
            f.write(hb)
            for name in names:
                x, _ = _to_numpy_bytes(tensors[name])
                f.write(x.tobytes(order="C"))
        os.replace(tmp, path)
    except BaseException:
        if tmp.exists():
            tmp.unlink()
        raise


def _free(arrays: dict) -> None:
    for a in arrays.values():
        try:
            a.free()
        except Exception:
            pass


# ---------------------------------------------------------------- config

def _read_json(path: Path, what: str) -> dict:
    try:
        with open(path) as f:
            d = json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: {what} not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise LoadError(f"{path}: invalid JSON: {e}") from None
    if not isinstance(d, dict):
        raise LoadError(f"{path}: expected a JSON object")
    return d


def _is_gguf(path: Path) -> bool:
    if path.suffix.lower() == ".gguf":
        return True
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"GGUF"
    except OSError:
        return False


def _text_config(config: dict) -> dict:
    """The language-model part of a config (gemma3 multimodal keeps it in text_config)."""
    tc = config.get("text_config")
    if isinstance(tc, dict) and config.get("model_type") == "gemma3":
        merged = dict(tc)
        merged.setdefault("model_type", "gemma3_text")
        for k in ("quantization", "quantization_config", "tie_word_embeddings"):
            if k in config and k not in merged:
                merged[k] = config[k]
        return merged
    return config


def load_config(path) -> dict:
    """The config dict of a checkpoint directory (config.json) or GGUF file
    (from its metadata); raises naming the file for a missing or unsupported one."""
    path = Path(path)
    if path.is_file() and _is_gguf(path):
        from mlxcy.models import gguf
        return gguf.gguf_config(gguf.read_header(path))
    if path.is_dir():
        cfg = _read_json(path / "config.json", "config.json")
        mt = cfg.get("model_type")
        if mt is None:
            raise LoadError(f"{path / 'config.json'}: no model_type")
        if mt not in SUPPORTED_MODEL_TYPES:
            raise LoadError(f"{path / 'config.json'}: unknown model_type {mt!r} "
                            f"(supported: {', '.join(SUPPORTED_MODEL_TYPES)})")
        return cfg
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such checkpoint (directory or .gguf file)")
    raise LoadError(f"{path}: not a checkpoint directory or GGUF file")


# ---------------------------------------------------------------- shapes

def _quant_params(quantization: dict | None, path: str):
    if not quantization:
        return None
    q = quantization.get(path, True)
    if q is False:
        return None
    base = {"group_size": quantization.get("group_size", 64), "bits": quantization.get("bits", 4)}
    if isinstance(q, dict):
        base.update({k: q[k] for k in ("group_size", "bits") if k in q})
    return base


def expected_shapes(config: dict, quantization: dict | None = None,
                    quantized: set | None = None) -> dict:
    """name -> (shape, kind) for every tensor a supported model needs.
    kind: "float" or "uint32". `quantized`: the module paths stored quantized
    (those with `.scales`); their `.weight/.scales/.biases` shapes follow
    (bits, group_size) from `quantization`."""
    c = _text_config(config)
    mt = c.get("model_type")
    h = c["hidden_size"]
    nh = c["num_attention_heads"]
    nkv = c.get("num_key_value_heads") or nh
    hd = c.get("head_dim") or h // nh
    ffn = c["intermediate_size"]
    vocab = c["vocab_size"]
    L = c["num_hidden_layers"]
    quantized = quantized or set()
    out = {}

    def lin(path, o, i, bias=False):
        q = _quant_params(quantization, path) if path in quantized else None
        if q:
            bits, gs = q["bits"], q["group_size"]
            if i % gs or (i * bits) % 32:
                out[path + ".weight"] = (None, f"input size {i} fits no group of {gs}")
                return
            out[path + ".weight"] = ((o, i * bits // 32), "uint32")
            out[path + ".scales"] = ((o, i // gs), "float")
            out[path + ".biases"] = ((o, i // gs), "float")
        else:
            out[path + ".weight"] = ((o, i), "float")
        if bias:
            out[path + ".bias"] = ((o,), "float")

    lin("model.embed_tokens", vocab, h)
    out["model.norm.weight"] = ((h,), "float")
    if not c.get("tie_word_embeddings", mt in ("gemma3_text", "gemma3")):
        lin("lm_head", vocab, h)
    qkv_bias = mt == "qwen2" or bool(c.get("attention_bias"))
    for i in range(L):
        p = f"model.layers.{i}"
        lin(f"{p}.self_attn.q_proj", nh * hd, h, qkv_bias)
        lin(f"{p}.self_attn.k_proj", nkv * hd, h, qkv_bias)
        lin(f"{p}.self_attn.v_proj", nkv * hd, h, qkv_bias)
        lin(f"{p}.self_attn.o_proj", h, nh * hd, bool(c.get("attention_bias")) and mt == "llama")
        lin(f"{p}.mlp.gate_proj", ffn, h, bool(c.get("mlp_bias")))
        lin(f"{p}.mlp.up_proj", ffn, h, bool(c.get("mlp_bias")))
        lin(f"{p}.mlp.down_proj", h, ffn, bool(c.get("mlp_bias")))
        out[f"{p}.input_layernorm.weight"] = ((h,), "float")
        out[f"{p}.post_attention_layernorm.weight"] = ((h,), "float")
        if mt in ("qwen3", "gemma3_text", "gemma3"):
            out[f"{p}.self_attn.q_norm.weight"] = ((hd,), "float")
            out[f"{p}.self_attn.k_norm.weight"] = ((hd,), "float")
        if mt in ("gemma3_text", "gemma3"):
            out[f"{p}.pre_feedforward_layernorm.weight"] = ((h,), "float")
            out[f"{p}.post_feedforward_layernorm.weight"] = ((h,), "float")
    return out


def _check(weights: dict, config: dict, quantization, where) -> None:
    """Raise LoadError naming file and tensor for a missing / misshapen tensor.
    `where(name)` says which file a tensor came from (or should have)."""
    quantized = {k[: -len(".scales")] for k in weights if k.endswith(".scales")}
    try:
        want = expected_shapes(config, quantization, quantized)
    except (KeyError, TypeError) as e:
        raise LoadError(f"{where(None)}: config lacks {e}") from None
    for name, (shape, kind) in want.items():
        a = weights.get(name)
        if a is None:
            raise LoadError(f"{where(name)}: tensor {name} is missing")
        if shape is None:
            raise LoadError(f"{where(name)}: tensor {name}: {kind}")
        if tuple(a.shape) != tuple(shape):
            raise LoadError(f"{where(name)}: tensor {name} has shape {tuple(a.shape)}, "
                            f"expected {tuple(shape)}")
        if kind == "float" and not a.dtype.is_floating:
            raise LoadError(f"{where(name)}: tensor {name} has dtype {a.dtype}, expected floats")
        if kind == "uint32" and str(a.dtype).rsplit(".", 1)[-1] != "uint32":
            raise LoadError(f"{where(name)}: quantized tensor {name} has dtype {a.dtype}, "
                            f"expected uint32")


# ---------------------------------------------------------------- weights

_DROP = ("rotary_emb.inv_freq",)


def _weight_files(d: Path) -> tuple[list[Path], dict | None]:
    """Safetensors files of a directory, and the index's weight_map if any."""
    idx = d / "model.safetensors.index.json"
    if idx.exists():
        data = _read_json(idx, "shard index")
        wm = data.get("weight_map")
        if not isinstance(wm, dict) or not wm:
            raise LoadError(f"{idx}: no weight_map")
        files = []
        for name, fn in wm.items():
            p = d / fn
            if p not in files:
                if not p.is_file():
                    raise FileNotFoundError(f"{idx}: shard {fn} (holding {name}) not found")
                files.append(p)
        return files, wm
    single = d / "model.safetensors"
    if single.is_file():
        return [single], None
    files = sorted(d.glob("model*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{d}: no model.safetensors, model.safetensors.index.json "
                                f"or model*.safetensors")
    return files, None


def _normalize_names(weights: dict, config: dict) -> dict:
    """Strip the multimodal gemma3 prefix and drop tensors no text model uses."""
    if config.get("model_type") == "gemma3" or any(k.startswith("language_model.") for k in weights):
        out = {}
        for k, v in weights.items():
            if k.startswith("language_model."):
                out[k[len("language_model."):]] = v
            elif k.startswith(("vision_tower.", "multi_modal_projector.")):
                v.free()
            else:
                out[k] = v
        weights = out
    for k in [k for k in weights if k.endswith(_DROP)]:
        weights.pop(k).free()
    return weights


def _load_dir(d: Path, dtype=None):
    config = load_config(d)
    files, wm = _weight_files(d)
    weights: dict = {}
    origin: dict = {}
    try:
        for f in files:
            ws, _ = read_safetensors(f)
            for k, v in ws.items():
                if k in weights:
                    _free(ws)
                    raise LoadError(f"{f}: tensor {k} also in {origin[k]}")
                weights[k] = v
                origin[k] = f
        if wm is not None:
            for name, fn in wm.items():
                if name not in weights:
                    raise LoadError(f"{d / fn}: tensor {name} (listed in "
                                    f"model.safetensors.index.json) is missing")
        weights = _normalize_names(weights, config)
        text = _text_config(config)
        quantization = text.get("quantization")
        if quantization is None and text.get("quantization_config", {}).get("quant_method"):
            raise LoadError(f"{d / 'config.json'}: quantization method "
                            f"{text['quantization_config']['quant_method']!r} is not supported")
        default = files[0] if len(files) == 1 else d / "model.safetensors.index.json"

        def where(name):
            if name is None:
                return d / "config.json"
            f = origin.get(name) or origin.get("language_model." + name)
            return f or default
        _check(weights, config, quantization, where)
        if dtype is not None:
            _cast_lazily(weights, dtype)
    except BaseException:
        _free(weights)
        raise
    return weights, config, quantization


def _cast_lazily(weights, dtype):
    """Replace each float tensor by its (lazy) cast.  The tensors from
    load_safetensors are lazy reads: cast here, each is read and cast on its
    own when the model evaluates it, and the source buffer is dropped at
    once.  Cast later, from the source array still held in this dict, every
    source tensor would stay in memory until the model is built (float32 ->
    bfloat16: the load peaked at 1.5x the float32 size)."""
    import mlxcy.core as core
    dt = core.dtype(dtype)
    for k in list(weights):
        if weights[k].dtype.is_floating and weights[k].dtype != dt:
            weights[k] = weights[k].astype(dt)


def load_weights(path, dtype=None):
    """(weights, config, quantization) of a directory or GGUF file, validated.
    For a GGUF file dtype chooses the float type (see gguf.load_gguf: default
    float32 for a file kept quantized, bfloat16 for a dequantized one; bfloat16
    dequantizes Q4_0/Q4_1/Q8_0). Directory weights are returned as stored
    (build_model casts)."""
    path = Path(path)
    if path.is_file() and _is_gguf(path):
        from mlxcy.models import gguf
        weights, config, quantization = gguf.load_gguf(path, dtype=dtype)
        try:
            _check(weights, config, quantization, lambda name: path)
        except BaseException:
            _free(weights)
            raise
        return weights, config, quantization
    if path.is_dir():
        return _load_dir(path, dtype)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such checkpoint (directory or .gguf file)")
    raise LoadError(f"{path}: not a checkpoint directory or GGUF file")


def load_model(path, dtype=None):
    """A Model from a checkpoint directory or GGUF file."""
    from mlxcy.models import build_model
    weights, config, quantization = load_weights(path, dtype)
    try:
        return build_model(config, weights, quantization=quantization, dtype=dtype)
    except BaseException as e:
        _free(weights)
        if isinstance(e, (ValueError, KeyError, TypeError)) and str(path) not in str(e):
            raise LoadError(f"{path}: {e}") from e
        raise


def load(path, dtype=None):
    """(model, tokenizer_source): tokenizer_source is {"kind": "hf", "path": dir}
    for a directory (tokenizer.json etc.) or {"kind": "gguf", "path": file}."""
    path = Path(path)
    model = load_model(path, dtype)
    kind = "gguf" if path.is_file() else "hf"
    return model, {"kind": kind, "path": str(path)}
