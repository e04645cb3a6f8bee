"""The tensors a model needs, as its family's spec lays them out, and the
check of a checkpoint's tensor table against them: every tensor present with
its shape and kind, before any tensor is read (LoadError naming the file, the
tensor and the config keys its shape comes from).  Used by the safetensors
loader (mlxcy.models.load) and the GGUF reader (mlxcy.models.gguf)."""
from __future__ import annotations

import re

from mlxcy.errors import LoadError
from mlxcy.models.config import ModelConfig

__all__ = ["expected_shapes", "check_tensors"]


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


def _config(config) -> ModelConfig:
    return config if isinstance(config, ModelConfig) else ModelConfig.from_dict(config)


def expected_shapes(config, quantization: dict | None = None,
                    quantized: set | None = None) -> dict:
    """name -> (shape, kind) for every tensor a model of this config (a dict
    or ModelConfig) needs, as its family's spec lays them out.  kind: "float"
    or "uint32".  `quantized`: the module paths stored quantized (those with
    `.scales`); their `.weight/.scales/.biases` shapes follow (bits,
    group_size) from `quantization`."""
    return {name: (shape, kind) for name, shape, kind, _ in
            _expected(_config(config), quantization, quantized or set())}


def _expected(cfg, quantization, quantized):
    """(name, shape or None, kind or message, config keys) per tensor."""
    for m in cfg.spec.modules(cfg):
        q = _quant_params(quantization, m.path) if m.quantizable and m.path in quantized else None
        o, i = m.shape[0], m.shape[-1]
        if q:
            bits, gs = q["bits"], q["group_size"]
            if i % gs or (i * bits) % 32:
                yield m.path + ".weight", None, f"input size {i} fits no group of {gs}", m.keys
                continue
            yield m.path + ".weight", (o, i * bits // 32), "uint32", m.keys
            yield m.path + ".scales", (o, i // gs), "float", m.keys
            yield m.path + ".biases", (o, i // gs), "float", m.keys
        else:
            yield m.path + ".weight", m.shape, "float", m.keys
        if m.bias:
            yield m.path + ".bias", (o,), "float", m.keys[:1]


_LAYER_NAME = re.compile(r"^model\.layers\.(\d+)\.")
_FLOAT_KINDS = ("float16", "float32", "bfloat16", "float64", "F16", "F32", "BF16", "F64")


def check_tensors(infos: dict, cfg: ModelConfig, quantization, where, config_file=None,
                  dtypes=True) -> None:
    """Raise LoadError naming the file and tensor (and the config keys its
    shape comes from) for a missing or misshapen tensor.  infos: name ->
    (shape, dtype name): safetensors headers before anything is read, or
    loaded arrays.  `where(name)` says which file a tensor came from (or
    should have); config_file: where the config came from."""
    config_file = config_file or where(None)
    layers = {int(m.group(1)) for m in map(_LAYER_NAME.match, infos) if m}
    n = cfg.num_hidden_layers
    if layers != set(range(n)):
        have = sorted(layers)
        have = (f"{len(have)} (model.layers.{have[0]} to {have[-1]})" if have else "none")
        raise LoadError(f"{config_file}: num_hidden_layers is {n} but the weights hold {have}")
    quantized = {k[: -len(".scales")] for k in infos if k.endswith(".scales")}
    for name, shape, kind, keys in _expected(cfg, quantization, quantized):
        info = infos.get(name)
        if info is None:
            raise LoadError(f"{where(name)}: tensor {name} is missing")
        if shape is None:
            raise LoadError(f"{where(name)}: tensor {name}: {kind}")
        have, dt = tuple(info[0]), str(info[1]).rsplit(".", 1)[-1]
        if have != tuple(shape):
            from_keys = ", ".join(f"{k}={_eval_key(cfg, k)}" for k in keys)
            raise LoadError(f"{where(name)}: tensor {name} has shape {have}, expected "
                            f"{tuple(shape)} (config {config_file}: {from_keys})")
        if not dtypes:
            continue
        if kind == "float" and dt not in _FLOAT_KINDS:
            raise LoadError(f"{where(name)}: tensor {name} has dtype {dt}, expected floats")
        if kind == "uint32" and dt not in ("uint32", "U32"):
            raise LoadError(f"{where(name)}: quantized tensor {name} has dtype {dt}, "
                            f"expected uint32")


def _eval_key(cfg, key):
    out = 1
    for k in key.split("*"):
        out *= getattr(cfg, k)
    return out
