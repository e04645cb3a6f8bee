"""A checked reader of safetensors headers, run before any bytes reach MLX.

MLX 0.32's own reader trusts the header: shapes whose products overflow its
int32 dimensions (`[2**32, 2**32]` with offsets [0, 0] reads as shape (0, 0);
`[2**31, 2**31, 4]` becomes an array of negative shape), offsets past the end
of the file, and so on.  `read_header` checks, with Python's unbounded ints:

- the 8-byte header length against the file size (and a 100 MB cap, as the
  safetensors format itself has);
- the header is UTF-8 JSON, an object with no duplicate keys, whose optional
  `__metadata__` maps str to str;
- every tensor has a known dtype, a shape of non-negative ints that fit MLX's
  int32 dimensions, data_offsets [begin, end] inside the data section, and
  end - begin == product(shape) * itemsize;
- no two tensors' byte ranges overlap.

Any failure raises ModelFormatError naming the file and the tensor or field.
"""
from __future__ import annotations

import json
import os
import struct

from mlxcy.errors import ModelFormatError

__all__ = ["read_header", "DTYPE_SIZES", "MAX_HEADER"]

# The dtypes MLX 0.32's safetensors reader accepts, and their item sizes
# (F8_E4M3 arrives as uint8; F64 and the other 8/4-bit floats it rejects).
DTYPE_SIZES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "U16": 2, "I16": 2, "F16": 2,
               "BF16": 2, "U32": 4, "I32": 4, "F32": 4, "U64": 8, "I64": 8, "C64": 8}
MAX_HEADER = 100_000_000
_INT32_MAX = 2**31 - 1


def _no_duplicates(pairs):
    out = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"duplicate key {k!r}")
        out[k] = v
    return out


def read_header(path) -> tuple[dict, dict, int]:
    """(tensors, metadata, data_start) of a safetensors file: tensors maps a
    name to {"dtype", "shape" (tuple), "begin", "end"} (byte offsets into the
    data section, which starts at data_start); raises ModelFormatError."""
    p = os.fspath(path)
    size = os.path.getsize(p)
    if size < 8:
        raise ModelFormatError(f"{p}: not a safetensors file ({size} bytes, fewer than the "
                               f"8-byte header length)")
    with open(p, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        if n > size - 8:
            raise ModelFormatError(f"{p}: safetensors header length {n} exceeds the file "
                                   f"({size} bytes): truncated or not a safetensors file")
        if n > MAX_HEADER:
            raise ModelFormatError(f"{p}: safetensors header length {n} exceeds the "
                                   f"{MAX_HEADER}-byte limit")
        raw = f.read(n)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ModelFormatError(f"{p}: safetensors header is not UTF-8 (byte {e.start})") from None
    try:
        header = json.loads(text, object_pairs_hook=_no_duplicates,
                            parse_constant=lambda c: _bad_constant(c))
    except (ValueError, RecursionError) as e:
        raise ModelFormatError(f"{p}: safetensors header is not valid JSON: {e}") from None
    if not isinstance(header, dict):
        raise ModelFormatError(f"{p}: safetensors header must be a JSON object, not "
                               f"{type(header).__name__}")
    meta = header.pop("__metadata__", None)
    if meta is None:
        meta = {}
    if not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                             for k, v in meta.items()):
        raise ModelFormatError(f"{p}: safetensors __metadata__ must map str to str")
    data_len = size - 8 - n
    tensors = {}
    for name, t in header.items():
        tensors[name] = _tensor(p, name, t, data_len)
    spans = sorted((t["begin"], t["end"], name) for name, t in tensors.items()
                   if t["end"] > t["begin"])
    for (b0, e0, n0), (b1, e1, n1) in zip(spans, spans[1:]):
        if b1 < e0:
            raise ModelFormatError(f"{p}: tensors {n0!r} (bytes {b0}-{e0}) and {n1!r} "
                                   f"(bytes {b1}-{e1}) overlap")
    return tensors, meta, 8 + n


def _bad_constant(c):
    raise ValueError(f"{c} is not allowed")


def _tensor(p, name, t, data_len):
    where = f"{p}: tensor {name!r}"
    if not name:
        raise ModelFormatError(f"{p}: a tensor has an empty name")
    if not isinstance(t, dict):
        raise ModelFormatError(f"{where}: entry must be a JSON object, not {type(t).__name__}")
    extra = set(t) - {"dtype", "shape", "data_offsets"}
    if extra:
        raise ModelFormatError(f"{where}: unknown field {sorted(extra)[0]!r}")
    dtype = t.get("dtype")
    if dtype not in DTYPE_SIZES:
        raise ModelFormatError(f"{where}: dtype {dtype!r} is not one of "
                               f"{', '.join(DTYPE_SIZES)}")
    shape = t.get("shape")
    if not isinstance(shape, list) or len(shape) > 32:
        raise ModelFormatError(f"{where}: shape must be a list of at most 32 ints, got "
                               f"{shape!r:.80}")
    count = 1
    for d in shape:
        if type(d) is not int or d < 0:
            raise ModelFormatError(f"{where}: shape {shape} has a dimension {d!r} that is "
                                   f"not a non-negative int")
        if d > _INT32_MAX:
            raise ModelFormatError(f"{where}: shape {shape} has a dimension {d} larger than "
                                   f"MLX's limit of 2**31 - 1")
        count *= d
    nbytes = count * DTYPE_SIZES[dtype]
    offs = t.get("data_offsets")
    if not (isinstance(offs, list) and len(offs) == 2
            and all(type(o) is int for o in offs)):
        raise ModelFormatError(f"{where}: data_offsets must be [begin, end] ints, got "
                               f"{offs!r:.80}")
    begin, end = offs
    if not 0 <= begin <= end <= data_len:
        raise ModelFormatError(f"{where}: data_offsets [{begin}, {end}] are outside the "
                               f"{data_len}-byte data section (truncated?)")
    if end - begin != nbytes:
        raise ModelFormatError(f"{where}: data_offsets [{begin}, {end}] hold {end - begin} "
                               f"bytes but shape {shape} of {dtype} needs {nbytes}")
    return {"dtype": dtype, "shape": tuple(shape), "begin": begin, "end": end}
