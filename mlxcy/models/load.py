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
from mlxcy.json_files import read_json_object  # noqa: E402


from mlxcy.models.families import MODEL_TYPES as _MODEL_TYPES  # noqa: E402
from mlxcy.models.config import ModelConfig  # noqa: E402
from mlxcy.models.spec import ConfigError  # noqa: E402
from mlxcy.models.check import check_tensors, expected_shapes  # noqa: E402,F401  (re-exported)

SUPPORTED_MODEL_TYPES = tuple(_MODEL_TYPES)

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
    import mlxcy.core as core
    out = {}
    mm = np.memmap(path, dtype=np.uint8, mode="r") if header else None
    try:
        for name, info in header.items():
            if names is not None and name not in names:
                continue
            npd, mlxname = _ST_DTYPES[info["dtype"]]
            b, e = info["data_offsets"]
            x = mm[start + b:start + e].view(np.ndarray).view(npd).reshape(info["shape"])
            a = core.array(x)
            if mlxname == "bfloat16":
                a = a.view(core.bfloat16)
            out[name] = a
    except BaseException:
        _free(out)
        raise
    finally:
        del mm
    return out, meta


def _to_numpy_bytes(a) -> tuple[np.ndarray, str]:
    import mlxcy.core as core
    name = str(a.dtype).rsplit(".", 1)[-1]
    if name not in _ST_NAMES:
        raise LoadError(f"cannot save dtype {a.dtype} to safetensors")
    x = a.view(core.uint16).numpy() if name == "bfloat16" else a.numpy()
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
        return read_json_object(path, LoadError)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: {what} not found") from None


def _is_gguf(path: Path) -> bool:
    if path.suffix.lower() == ".gguf":
        return True
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"GGUF"
    except OSError:
        return False


def _text_config(config: dict) -> dict:
    """The language-model part of a config (gemma3 multimodal keeps it in
    text_config), with the top level's quantization settings."""
    spec = _MODEL_TYPES.get(config.get("model_type"))
    if spec is None:
        return config
    text = spec.text_config(config)
    if text is config:
        return config
    merged = dict(text, model_type=spec.model_type_of(config))
    for k in ("quantization", "quantization_config"):
        if k in config and k not in merged:
            merged[k] = config[k]
    return merged


def parse_config(config: dict, where) -> ModelConfig:
    """The validated ModelConfig of a config dict; LoadError naming `where`
    (the file) and the key."""
    try:
        return ModelConfig.from_dict(config)
    except ConfigError as e:
        raise LoadError(f"{where}: {e}") from None
    except (ValueError, TypeError) as e:
        raise LoadError(f"{where}: config: {e}") from None


def load_config(path) -> dict:
    """The config dict of a checkpoint directory (config.json) or GGUF file
    (from its metadata), validated (every key typed and bounded by its
    family's spec); raises naming the file and key for a missing, malformed
    or unsupported one."""
    path = Path(path)
    if path.is_file() and _is_gguf(path):
        from mlxcy.models import gguf
        return gguf.gguf_config(gguf.read_header(path))
    if path.is_dir():
        f = path / "config.json"
        cfg = _read_json(f, "config.json")
        mt = cfg.get("model_type")
        if mt is None:
            raise LoadError(f"{f}: no model_type")
        if mt not in SUPPORTED_MODEL_TYPES:
            raise LoadError(f"{f}: unknown model_type {mt!r} "
                            f"(supported: {', '.join(SUPPORTED_MODEL_TYPES)})")
        parse_config(cfg, f)
        return cfg
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such checkpoint (directory or .gguf file)")
    raise LoadError(f"{path}: not a checkpoint directory or GGUF file")


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


def _normalize_names(weights: dict, spec) -> dict:
    """The text model's names (the family's prefixes renamed, tensors no text
    model uses dropped and freed)."""
    out = {}
    for k, v in weights.items():
        new = spec.rename(k)
        if new is None or new.endswith(_DROP):
            if hasattr(v, "free"):
                v.free()
        else:
            out[new] = v
    return out


def scan_dir(d: Path):
    """A checkpoint directory checked before any tensor is read: (config dict,
    ModelConfig, quantization or None, weight files, tensors), tensors mapping
    each tensor's mlxcy name to (its file, its stored name, (shape, dtype)).
    LoadError names the file and tensor for a tensor stored twice, one the
    index lists but no file holds, an unsupported quantization, or a tensor
    missing or misshapen for the config (check_tensors)."""
    d = Path(d)
    config_file = d / "config.json"
    config = load_config(d)
    text = _text_config(config)
    cfg = parse_config(config, config_file)
    files, wm = _weight_files(d)
    origin: dict = {}               # stored name -> (file, header entry)
    for f in files:
        header, _, _ = safetensors_header(f)
        for k, info in header.items():
            if k in origin:
                raise LoadError(f"{f}: tensor {k} also in {origin[k][0]}")
            origin[k] = (f, info)
    if wm is not None:
        for name, fn in wm.items():
            if name not in origin:
                raise LoadError(f"{d / fn}: tensor {name} (listed in "
                                f"model.safetensors.index.json) is missing")
    tensors: dict = {}
    for k, (f, info) in origin.items():
        new = cfg.spec.rename(k)
        if new is None or new.endswith(_DROP):
            continue
        if new in tensors:
            raise LoadError(f"{f}: tensors {k} and {tensors[new][1]} ({tensors[new][0]}) "
                            f"are both the model's {new}")
        tensors[new] = (f, k, (info["shape"], info["dtype"]))
    quantization = text.get("quantization")
    qc = text.get("quantization_config")
    if quantization is None and isinstance(qc, dict) and qc.get("quant_method"):
        raise LoadError(f"{config_file}: quantization method {qc['quant_method']!r} "
                        f"is not supported")
    if quantization is not None and not isinstance(quantization, dict):
        raise LoadError(f"{config_file}: 'quantization' must be an object")
    default = files[0] if len(files) == 1 else d / "model.safetensors.index.json"

    def where(name):
        return config_file if name is None else tensors[name][0] if name in tensors else default
    check_tensors({n: t[2] for n, t in tensors.items()}, cfg, quantization, where, config_file)
    return config, cfg, quantization, files, tensors


def _load_dir(d: Path, dtype=None):
    config, cfg, quantization, files, _ = scan_dir(d)
    weights: dict = {}
    try:
        for f in files:
            ws, _ = read_safetensors(f)
            weights.update(ws)
        weights = _normalize_names(weights, cfg.spec)
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
    """(weights, config, quantization) of a directory or GGUF file, validated:
    the config's keys by their family's spec, then every tensor's name, shape
    and dtype against the config, from the file headers before any tensor is
    read.  For a GGUF file dtype chooses the float type (see gguf.load_gguf:
    default float32 for a file kept quantized, bfloat16 for a dequantized
    one; bfloat16 dequantizes Q4_0/Q4_1/Q8_0). Directory weights are returned
    as stored (build_model casts)."""
    path = Path(path)
    if path.is_file() and _is_gguf(path):
        from mlxcy.models import gguf
        weights, config, quantization = gguf.load_gguf(path, dtype=dtype)
        try:
            infos = {k: (a.shape, a.dtype) for k, a in weights.items()}
            check_tensors(infos, gguf.parse_gguf_config(config, path), quantization,
                          lambda name: path)
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
