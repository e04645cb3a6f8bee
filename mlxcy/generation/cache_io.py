"""Save and load a KV cache (with the token ids it holds) as safetensors, so a
chat session or a long shared prompt can be resumed without prefilling.

A saved file is checked before any of it reaches the model's cache: the
metadata (JSON, types), every layer's counters against its arrays' shapes and
against the token ids stored beside them.  Anything inconsistent raises
SessionError naming the file and the layer or field."""
from __future__ import annotations

import json

from mlxcy import io
from mlxcy.errors import SessionError

__all__ = ["save_cache", "load_cache", "SessionError"]


def save_cache(path, cache, ids) -> None:
    """Write every layer's buffers and counters, plus `ids`, to `path`."""
    arrays, layers = {}, []
    for i, layer in enumerate(cache.layers):
        st = layer.state()
        if st["keys"] is not None:
            arrays[f"{i}.keys"], arrays[f"{i}.values"] = st["keys"], st["values"]
        layers.append({k: st[k] for k in ("offset", "filled", "idx")} | {"window": layer.window})
    from mlxcy.models.cache import kv_quantization
    meta = {"mlxcy.cache": "1", "layers": json.dumps(layers),
            "ids": json.dumps([int(i) for i in ids]),
            "kv_quantization": json.dumps(kv_quantization(cache))}
    io.save_safetensors(str(path), arrays, meta)


_JSON_KINDS = {list: "list", dict: "object", type(None): "null"}


def _json(path, meta, key, kind):
    """meta[key] parsed as JSON, of type `kind` (a type or a tuple of them)."""
    if key not in meta:
        raise SessionError(f"{path}: metadata key {key!r} is missing")
    try:
        v = json.loads(meta[key])
    except (ValueError, RecursionError) as e:
        raise SessionError(f"{path}: metadata key {key!r} is not valid JSON ({e})") from None
    if not isinstance(v, kind):
        kinds = kind if isinstance(kind, tuple) else (kind,)
        raise SessionError(f"{path}: metadata key {key!r} must be a JSON "
                           f"{' or '.join(_JSON_KINDS[k] for k in kinds)}, not {type(v).__name__}")
    return v


def _kv_quantization(path, meta):
    """The file's (bits, group_size), or None: a cache of unquantized layers
    (metadata null, or no key in files written before it existed)."""
    if "kv_quantization" not in meta:
        return None
    kvq = _json(path, meta, "kv_quantization", (list, type(None)))
    if kvq is None:
        return None
    if len(kvq) != 2 or any(type(v) is not int for v in kvq):
        raise SessionError(f"{path}: metadata 'kv_quantization' {kvq!r} must be "
                           f"[bits, group_size], two ints")
    from mlxcy.models.cache import check_kv_options
    try:
        check_kv_options(*kvq)
    except ValueError as e:
        raise SessionError(f"{path}: metadata 'kv_quantization' {kvq!r}: {e}") from None
    return tuple(kvq)


def _count(path, i, st, key, lo=0):
    v = st.get(key)
    if type(v) is not int or v < lo or v > 2**31 - 1:
        raise SessionError(f"{path}: layer {i}: {key!r} must be an int in [{lo}, 2**31), got {v!r}")
    return v


def _check_layer(path, i, st, window, keys, values, n_ids, heads_dim, kvq=None):
    """kvq: (bits, group_size) when the layer is a QuantizedKVCache (uint32 rows
    of packed values, scales and biases: see mlxcy.models.cache.QuantizedKVCache)."""
    if not isinstance(st, dict):
        raise SessionError(f"{path}: layer {i}: expected a JSON object, got {type(st).__name__}")
    if st.get("window") != window:
        raise SessionError(f"{path}: layer {i}: window {st.get('window')!r} differs from the "
                           f"model's {window}")
    offset, filled, idx = (_count(path, i, st, k) for k in ("offset", "filled", "idx"))
    if offset != n_ids:
        raise SessionError(f"{path}: layer {i}: offset {offset} differs from the {n_ids} "
                           f"token ids stored")
    if (keys is None) != (values is None):
        raise SessionError(f"{path}: layer {i}: has {'keys' if values is None else 'values'} "
                           f"but not {'values' if values is None else 'keys'}")
    if keys is None:
        if offset:
            raise SessionError(f"{path}: layer {i}: offset {offset} but no keys/values arrays")
        if filled or idx:
            raise SessionError(f"{path}: layer {i}: filled/idx set but no keys/values arrays")
        return
    if keys.ndim != 4 or keys.shape != values.shape:
        raise SessionError(f"{path}: layer {i}: keys {keys.shape} and values {values.shape} "
                           f"must share a [batch, heads, positions, head_dim] shape")
    if kvq is not None:
        if keys.dtype != values.dtype or "uint32" not in str(keys.dtype):
            raise SessionError(f"{path}: layer {i}: quantized keys/values must be uint32 "
                               f"({keys.dtype}, {values.dtype})")
        if heads_dim is not None:
            bits, gs = kvq
            words = heads_dim[1] * bits // 32 + 2 * (heads_dim[1] // gs)
            heads_dim = (heads_dim[0], words)
    elif keys.dtype != values.dtype or not keys.dtype.is_floating:
        raise SessionError(f"{path}: layer {i}: keys/values must share a float dtype "
                           f"({keys.dtype}, {values.dtype})")
    if keys.shape[0] != 1 or min(keys.shape[1], keys.shape[3]) < 1:
        raise SessionError(f"{path}: layer {i}: keys shape {keys.shape} is not that of a "
                           f"one-sequence cache")
    if heads_dim is not None and (keys.shape[1], keys.shape[3]) != heads_dim:
        raise SessionError(f"{path}: layer {i}: keys shape {keys.shape} does not fit the "
                           f"model's (kv heads, head_dim) = {heads_dim}")
    cap = keys.shape[2]
    if window == 0:
        if offset > cap:
            raise SessionError(f"{path}: layer {i}: offset {offset} exceeds the {cap} "
                               f"positions its keys hold")
        if filled or idx:
            raise SessionError(f"{path}: layer {i}: 'filled'/'idx' must be 0 for a full cache")
        return
    if filled > min(window, offset, cap):
        raise SessionError(f"{path}: layer {i}: filled {filled} exceeds min(window {window}, "
                           f"offset {offset}, {cap} positions held)")
    if filled < window and (filled != offset or idx != filled):
        raise SessionError(f"{path}: layer {i}: a ring not yet full must have filled == offset "
                           f"== idx (filled {filled}, offset {offset}, idx {idx})")
    if idx >= window and not (filled < window and idx == filled):
        raise SessionError(f"{path}: layer {i}: idx {idx} is outside the window {window}")


def load_cache(path, model):
    """Read a cache written by save_cache for `model`: returns (cache, ids)."""
    from mlxcy.errors import ModelFormatError
    try:
        arrays, meta = io.load_safetensors(str(path))
    except ModelFormatError as e:
        raise SessionError(str(e)) from None
    try:
        if meta.get("mlxcy.cache") != "1":
            raise SessionError(f"{path}: not an mlxcy cache file (metadata 'mlxcy.cache' is "
                               f"{meta.get('mlxcy.cache')!r}, expected '1')")
        layers = _json(path, meta, "layers", list)
        ids = _json(path, meta, "ids", list)
        cfg = getattr(model, "config", None)
        vocab = getattr(cfg, "vocab_size", None)
        kv, hd = getattr(cfg, "num_key_value_heads", None), getattr(cfg, "head_dim", None)
        heads_dim = (kv, hd) if isinstance(kv, int) and isinstance(hd, int) else None
        for j, t in enumerate(ids):
            if type(t) is not int or t < 0 or (isinstance(vocab, int) and t >= vocab):
                raise SessionError(f"{path}: ids[{j}] = {t!r} is not a token id"
                                   + (f" of this model (vocabulary {vocab})" if vocab else ""))
        from mlxcy.models.cache import quantized_cache, QuantizedKVCache
        kvq = _kv_quantization(path, meta)
        cache = model.make_cache() if kvq is None else quantized_cache(model.make_cache(), *kvq)
        if len(layers) != len(cache.layers):
            raise SessionError(f"{path}: cache has {len(layers)} layers, the model "
                               f"{len(cache.layers)}")
        known = {f"{i}.{k}" for i in range(len(layers)) for k in ("keys", "values")}
        extra = sorted(set(arrays) - known)
        if extra:
            raise SessionError(f"{path}: unexpected array {extra[0]!r}")
        for i, (layer, st) in enumerate(zip(cache.layers, layers)):
            _check_layer(path, i, st, layer.window, arrays.get(f"{i}.keys"),
                         arrays.get(f"{i}.values"), len(ids), heads_dim,
                         kvq if isinstance(layer, QuantizedKVCache) else None)
        for i, (layer, st) in enumerate(zip(cache.layers, layers)):
            layer.set_state(arrays.get(f"{i}.keys"), arrays.get(f"{i}.values"), st["offset"],
                            st["filled"], st["idx"])
        return cache, ids
    except BaseException:
        for a in arrays.values():
            a.free()
        raise
