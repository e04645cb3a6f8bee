"""Read only the key/value metadata of a GGUF file.

`gguf.GGUFReader` also parses every tensor descriptor with numpy, which takes
tens of seconds on a 250 MB model; a tokenizer needs just the header, so this
reads the header and stops before the tensor table.
"""
from __future__ import annotations

import struct

import numpy as np

from .errors import TokenizerError

_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?",
            10: "<Q", 11: "<q", 12: "<d"}
_NUMPY = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "?",
          10: "<u8", 11: "<i8", 12: "<f8"}
STRING, ARRAY = 8, 9


class _Cursor:
    def __init__(self, data: memoryview, path: str):
        self.data, self.pos, self.path = data, 0, path

    def take(self, n: int) -> memoryview:
        if self.pos + n > len(self.data):
            raise TokenizerError(f"{self.path}: GGUF metadata is truncated")
        out = self.data[self.pos:self.pos + n]
        self.pos += n
        return out

    def scalar(self, fmt: str):
        return struct.unpack(fmt, self.take(struct.calcsize(fmt)))[0]

    def string(self) -> str:
        return bytes(self.take(self.scalar("<Q"))).decode("utf-8", "surrogateescape")

    def value(self, vtype: int):
        if vtype in _SCALARS:
            return self.scalar(_SCALARS[vtype])
        if vtype == STRING:
            return self.string()
        if vtype == ARRAY:
            itype, count = self.scalar("<I"), self.scalar("<Q")
            if itype in _NUMPY:
                dt = np.dtype(_NUMPY[itype])
                return np.frombuffer(self.take(dt.itemsize * count), dtype=dt).tolist()
            return [self.value(itype) for _ in range(count)]
        raise TokenizerError(f"{self.path}: unknown GGUF value type {vtype}")


def read_metadata(path) -> dict:
    """All metadata key/values of a GGUF file, as Python values."""
    import mmap
    with open(path, "rb") as f:
        try:
            mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except ValueError as e:
            raise TokenizerError(f"{path}: empty or unreadable GGUF file") from e
    cur = _Cursor(memoryview(mm), str(path))
    if bytes(cur.take(4)) != b"GGUF":
        raise TokenizerError(f"{path}: not a GGUF file (bad magic)")
    version = cur.scalar("<I")
    if version not in (2, 3):
        raise TokenizerError(f"{path}: unsupported GGUF version {version}")
    cur.scalar("<Q")  # tensor count
    meta = {}
    for _ in range(cur.scalar("<Q")):
        key = cur.string()
        meta[key] = cur.value(cur.scalar("<I"))
    return meta
