"""Save and load a KV cache (with the token ids it holds) as safetensors, so a
chat session or a long shared prompt can be resumed without prefilling."""
from __future__ import annotations

import json

from mlxcy import io


def save_cache(path, cache, ids) -> None:
    """Write every layer's buffers and counters, plus `ids`, to `path`."""
    arrays, layers = {}, []
    for i, layer in enumerate(cache.layers):
        st = layer.state()
        if st["keys"] is not None:
            arrays[f"{i}.keys"], arrays[f"{i}.values"] = st["keys"], st["values"]
        layers.append({k: st[k] for k in ("offset", "filled", "idx")} | {"window": layer.window})
    from mlxcy.cache import kv_quantization
    meta = {"mlxcy.cache": "1", "layers": json.dumps(layers), "ids": json.dumps(list(ids)),
            "kv_quantization": json.dumps(kv_quantization(cache))}
    io.save_safetensors(str(path), arrays, meta)


def load_cache(path, model):
    """Read a cache written by save_cache for `model`: returns (cache, ids)."""
    arrays, meta = io.load_safetensors(str(path))
    if meta.get("mlxcy.cache") != "1":
        raise ValueError(f"{path}: not an mlxcy cache file")
    from mlxcy.cache import quantized_cache
    layers = json.loads(meta["layers"])
    kvq = json.loads(meta.get("kv_quantization", "null"))     # [bits, group_size] or None
    cache = quantized_cache(model.make_cache(), *(kvq or (None,)))
    if len(layers) != len(cache.layers):
        raise ValueError(f"{path}: cache has {len(layers)} layers, the model {len(cache.layers)}")
    for i, (layer, st) in enumerate(zip(cache.layers, layers)):
        if st["window"] != layer.window:
            raise ValueError(f"{path}: layer {i} window {st['window']} != model's {layer.window}")
        layer.set_state(arrays.get(f"{i}.keys"), arrays.get(f"{i}.values"), st["offset"],
                        st["filled"], st["idx"])
    return cache, json.loads(meta["ids"])
