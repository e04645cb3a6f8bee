"""The one GGUF header reader of mlxcy: models, tokenizers, chat templates and
`mlxcy.io.load_gguf` all parse GGUF files through `read_header`.

It is pure Python, never touches tensor data, and checks everything before
allocating or handing the file to MLX's own reader (which trusts the header
and crashes on a malformed one):

- magic, version (2 or 3), tensor and key counts against the bytes left;
- every string, array and value against the file length before it is read,
  value and element types known, no array of arrays nested past one level,
  no duplicate keys or tensor names;
- `general.alignment` an unsigned int, a power of two (0 is refused);
- every tensor: 1 to 4 dimensions, each in [1, 2**31 - 1], a known ggml
  type whose block divides the row length, its offset aligned, its bytes
  (shape x type size, computed with Python's unbounded ints) inside the
  file, and no two tensors overlapping.

Any failure raises GGUFError naming the file and the key or tensor.
"""
from __future__ import annotations

import mmap
import os
import struct
from pathlib import Path

import numpy as np

from mlxcy.errors import GGUFError

__all__ = ["GGUFError", "GGUFHeader", "read_header", "read_metadata", "TYPE_NAMES",
           "BLOCK", "NATIVE_TYPES", "MLX_TYPES", "tensor_nbytes", "check_model_metadata"]

# ggml tensor types (ggml.h): id -> name
TYPE_NAMES = {0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 6: "Q5_0", 7: "Q5_1", 8: "Q8_0",
              9: "Q8_1", 10: "Q2_K", 11: "Q3_K", 12: "Q4_K", 13: "Q5_K", 14: "Q6_K",
              15: "Q8_K", 16: "IQ2_XXS", 17: "IQ2_XS", 18: "IQ3_XXS", 19: "IQ1_S",
              20: "IQ4_NL", 21: "IQ3_S", 22: "IQ2_S", 23: "IQ4_XS", 24: "I8", 25: "I16",
              26: "I32", 27: "I64", 28: "F64", 29: "IQ1_M", 30: "BF16", 34: "TQ1_0",
              35: "TQ2_0"}
# id -> (values per block, bytes per block), for the types we can size
BLOCK = {0: (1, 4), 1: (1, 2), 30: (1, 2), 28: (1, 8), 24: (1, 1), 25: (1, 2), 26: (1, 4),
         27: (1, 8), 2: (32, 18), 3: (32, 20), 6: (32, 22), 7: (32, 24), 8: (32, 34),
         9: (32, 36), 10: (256, 84), 11: (256, 110), 12: (256, 144), 13: (256, 176),
         14: (256, 210), 15: (256, 292)}
# Types MLX keeps quantized (as mlx::core::load_gguf does) or reads as floats.
NATIVE_TYPES = {0, 1, 30, 2, 3, 8}
# Types mlx::core::load_gguf (MLX 0.32) reads, found by giving it one tensor of
# each type id: F32, F16, BF16, I8, I16, I32 directly, Q4_0/Q4_1/Q8_0
# repacked, Q2_K/Q4_K/Q6_K converted to float16 by its bundled gguflib.  Ids
# 4 and 5 (retired Q4_2/Q4_3) crash it with SIGFPE (a zero block size); the
# other quantized types fail in gguflib.  mlxcy.io.load_gguf refuses the rest.
MLX_TYPES = {0, 1, 30, 24, 25, 26, 2, 3, 8, 10, 12, 14}

# metadata value types -> struct format
SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?",
           10: "<Q", 11: "<q", 12: "<d"}
STRING, ARRAY = 8, 9
_INT32_MAX = 2**31 - 1
MAX_DIMS = 4


def tensor_nbytes(dims, ttype):
    """Bytes of a tensor of ggml dims (innermost first) and type, or None for a
    type we cannot size; raises ValueError when the row is not whole blocks."""
    if ttype not in BLOCK:
        return None
    bs, tsz = BLOCK[ttype]
    if dims and dims[0] % bs:
        raise ValueError(f"row length {dims[0]} is not a multiple of the "
                         f"{TYPE_NAMES[ttype]} block of {bs}")
    n = 1
    for d in dims:
        n *= d
    return n // bs * tsz


class _Reader:
    __slots__ = ("buf", "pos", "path", "size")

    def __init__(self, buf, path, size):
        self.buf, self.pos, self.path, self.size = buf, 0, path, size

    def need(self, n, what):
        if n < 0 or self.pos + n > self.size:
            raise GGUFError(f"{self.path}: truncated GGUF header while reading {what} "
                            f"(needs {self.pos + n} bytes, file has {self.size})")

    def scalar(self, fmt, what):
        n = struct.calcsize(fmt)
        self.need(n, what)
        v = struct.unpack_from(fmt, self.buf, self.pos)[0]
        self.pos += n
        return v

    def string(self, what):
        n = self.scalar("<Q", what)
        self.need(n, what)
        s = bytes(self.buf[self.pos:self.pos + n])
        self.pos += n
        return s.decode("utf-8", "surrogateescape")

    def skip_string(self, what):
        n = self.scalar("<Q", what)
        self.need(n, what)
        self.pos += n

    def value(self, vtype, what, keep, depth=0):
        if vtype in SCALARS:
            return self.scalar(SCALARS[vtype], what)
        if vtype == STRING:
            return self.string(what)
        if vtype != ARRAY:
            raise GGUFError(f"{self.path}: {what} has unknown value type {vtype}")
        etype = self.scalar("<I", what)
        count = self.scalar("<Q", what)
        if etype in SCALARS:
            fmt = SCALARS[etype]
            nb = struct.calcsize(fmt) * count
            self.need(nb, what)
            if keep or count <= 64:
                arr = np.frombuffer(self.buf, dtype=np.dtype(fmt), count=count,
                                    offset=self.pos).copy()
                self.pos += nb
                return arr.tolist() if count <= 64 else arr
            self.pos += nb
            return Skipped(count, etype)
        if etype == STRING:
            self.need(8 * count, what)          # each string has an 8-byte length at least
            if keep or count <= 64:
                return [self.string(what) for _ in range(count)]
            for _ in range(count):
                self.skip_string(what)
            return Skipped(count, etype)
        if etype == ARRAY:
            if depth >= 1:
                raise GGUFError(f"{self.path}: {what}: arrays nested more "
                                f"than two deep are not supported")
            self.need(12 * count, what)         # each inner array: type and count at least
            return [self.value(ARRAY, what, keep, depth + 1) for _ in range(count)]
        raise GGUFError(f"{self.path}: {what} has unknown array element "
                        f"type {etype}")


class Skipped:
    """An array left unread by read_header (its length is known)."""
    __slots__ = ("count", "etype")

    def __init__(self, count, etype):
        self.count, self.etype = count, etype

    def __len__(self):
        return self.count

    def __repr__(self):
        return f"<array of {self.count} not read>"


class GGUFHeader:
    """Metadata and tensor table of a GGUF file (no tensor data)."""

    def __init__(self, path, version, metadata, tensors, data_offset, size):
        self.path = path
        self.version = version
        self.metadata = metadata
        # name -> dict(shape=numpy order, dims=ggml order, type=, offset=abs, nbytes=)
        self.tensors = tensors
        self.data_offset = data_offset
        self.size = size

    @property
    def architecture(self):
        return self.metadata.get("general.architecture")

    def type_counts(self):
        out = {}
        for t in self.tensors.values():
            name = TYPE_NAMES.get(t["type"], str(t["type"]))
            out[name] = out.get(name, 0) + 1
        return out


def _keep(keep_arrays, key):
    if isinstance(keep_arrays, bool):
        return keep_arrays
    if callable(keep_arrays):
        return keep_arrays(key)
    return key in keep_arrays


def read_header(path, keep_arrays=False) -> GGUFHeader:
    """Parse and check a GGUF file's header.  Metadata arrays longer than 64
    are skipped (a `Skipped`) unless `keep_arrays` is True, a collection of
    keys, or a predicate on the key; raises GGUFError naming the file and
    the key or tensor on anything malformed."""
    path = Path(os.fspath(path))
    if not path.is_file():
        if path.is_dir():
            raise IsADirectoryError(21, "is a directory, not a GGUF file", str(path))
        raise FileNotFoundError(2, "no such GGUF file", str(path))
    size = path.stat().st_size
    if size < 24:
        raise GGUFError(f"{path}: truncated or not a GGUF file (only {size} bytes)")
    with open(path, "rb") as f:
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    try:
        return _parse(mm, path, size, keep_arrays)
    finally:
        mm.close()


def _parse(mm, path, size, keep_arrays):
    r = _Reader(mm, path, size)
    if bytes(mm[:4]) != b"GGUF":
        raise GGUFError(f"{path}: not a GGUF file (magic {bytes(mm[:4])!r})")
    r.pos = 4
    version = r.scalar("<I", "version")
    if version not in (2, 3):
        raise GGUFError(f"{path}: unsupported GGUF version {version}")
    n_tensors = r.scalar("<Q", "tensor count")
    n_kv = r.scalar("<Q", "metadata count")
    # a key/value takes 8 + 4 bytes at least, a tensor entry 8 + 4 + 8 + 4 + 8
    if n_kv * 12 + n_tensors * 32 > size - r.pos:
        raise GGUFError(f"{path}: {n_tensors} tensors and {n_kv} metadata keys cannot fit "
                        f"in a {size}-byte file (truncated or corrupt)")
    meta = {}
    for _ in range(n_kv):
        key = r.string("a metadata key")
        vtype = r.scalar("<I", f"the type of metadata key {key!r}")
        if key in meta:
            raise GGUFError(f"{path}: metadata key {key!r} appears twice")
        meta[key] = r.value(vtype, f"metadata key {key!r}", _keep(keep_arrays, key))
    infos = []
    for _ in range(n_tensors):
        name = r.string("a tensor name")
        nd = r.scalar("<I", f"tensor {name!r}")
        if not 1 <= nd <= MAX_DIMS:
            raise GGUFError(f"{path}: tensor {name!r} has {nd} dimensions (1 to {MAX_DIMS} "
                            f"supported)")
        dims = [r.scalar("<Q", f"tensor {name!r}") for _ in range(nd)]
        ttype = r.scalar("<I", f"tensor {name!r}")
        off = r.scalar("<Q", f"tensor {name!r}")
        infos.append((name, dims, ttype, off))
    align = meta.get("general.alignment", 32)
    if type(align) is not int or isinstance(align, bool) or align <= 0 or align & (align - 1) \
            or align > 1 << 16:
        raise GGUFError(f"{path}: metadata key 'general.alignment' = {align!r} is not a "
                        f"power of two in [1, 65536]")
    # (a file without tensors may end right after its metadata, unpadded)
    data_offset = (r.pos + align - 1) // align * align
    tensors = {}
    for name, dims, ttype, off in infos:
        where = f"{path}: tensor {name!r}"
        if name in tensors:
            raise GGUFError(f"{where} appears twice")
        if any(d < 1 or d > _INT32_MAX for d in dims):
            raise GGUFError(f"{where}: dimensions {dims} must each be in [1, 2**31 - 1]")
        if ttype not in TYPE_NAMES:
            raise GGUFError(f"{where}: unknown ggml type {ttype}")
        try:
            nbytes = tensor_nbytes(dims, ttype)
        except ValueError as e:
            raise GGUFError(f"{where}: {e}") from None
        if off % align:
            raise GGUFError(f"{where}: offset {off} is not a multiple of the alignment {align}")
        start = data_offset + off
        if nbytes is not None and start + nbytes > size:
            raise GGUFError(f"{where} ends at byte {start + nbytes} but the file has {size} "
                            f"bytes (truncated?)")
        if nbytes is None and start > size:
            raise GGUFError(f"{where} starts at byte {start}, past the end of the file")
        tensors[name] = {"shape": tuple(int(d) for d in reversed(dims)), "dims": tuple(dims),
                         "type": ttype, "offset": start, "nbytes": nbytes}
    spans = sorted((t["offset"], t["offset"] + t["nbytes"], n) for n, t in tensors.items()
                   if t["nbytes"])
    for (b0, e0, n0), (b1, e1, n1) in zip(spans, spans[1:]):
        if b1 < e0:
            raise GGUFError(f"{path}: tensors {n0!r} (bytes {b0}-{e0}) and {n1!r} "
                            f"(bytes {b1}-{e1}) overlap")
    return GGUFHeader(path, version, meta, tensors, data_offset, size)


def read_metadata(path, keep_arrays=True) -> dict:
    """The key/value metadata of a checked GGUF file, numeric arrays as lists."""
    meta = read_header(path, keep_arrays=keep_arrays).metadata
    return {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in meta.items()}


# ------------------------------------------------------------ model metadata --

# {arch}.<key> -> upper bound, for the size keys a model config is built from
_SIZE_KEYS = {"block_count": 1024, "embedding_length": 1 << 20, "feed_forward_length": 1 << 22,
              "attention.head_count": 4096, "attention.head_count_kv": 4096,
              "attention.key_length": 1 << 16, "attention.value_length": 1 << 16,
              "context_length": 1 << 26, "vocab_size": 1 << 26,
              "attention.sliding_window": 1 << 26, "rope.scaling.original_context_length": 1 << 26}
_FLOAT_KEYS = ("attention.layer_norm_rms_epsilon", "rope.freq_base", "rope.scaling.factor")
# the Hugging Face config field each size key becomes
_HF_NAMES = {"block_count": "num_hidden_layers", "embedding_length": "hidden_size",
             "feed_forward_length": "intermediate_size",
             "attention.head_count": "num_attention_heads",
             "attention.head_count_kv": "num_key_value_heads", "attention.key_length": "head_dim",
             "context_length": "max_position_embeddings", "vocab_size": "vocab_size",
             "attention.sliding_window": "sliding_window"}


def check_model_metadata(header: GGUFHeader) -> None:
    """Check the metadata a model is built from before anything is sized by it:
    size keys are ints in sane bounds, floats finite and positive, and
    `block_count`, `embedding_length` and the vocabulary agree with the tensors
    the file holds (a `block_count` of 4294967295 would otherwise have the
    loader allocate that many layers).  Raises GGUFError naming the key."""
    import math
    import re
    path, meta = header.path, header.metadata
    arch = meta.get("general.architecture")
    if not isinstance(arch, str):
        raise GGUFError(f"{path}: metadata key 'general.architecture' must be a string, "
                        f"got {arch!r:.60}")
    vals = {}
    for key, hi in _SIZE_KEYS.items():
        full = f"{arch}.{key}"
        v = meta.get(full)
        if v is None:
            continue
        items = v if isinstance(v, list) else [v]
        if isinstance(v, Skipped) or not items or any(
                type(x) is not int or not 1 <= x <= hi for x in items):
            raise GGUFError(f"{path}: {_HF_NAMES.get(key, full)} = {v!r:.60} must be an int in "
                            f"[1, {hi}]" + (" (or a list of them)" if isinstance(v, list) else "")
                            + f" (GGUF metadata {full!r})")
        vals[key] = items
    for key in _FLOAT_KEYS:
        full = f"{arch}.{key}"
        v = meta.get(full)
        if v is not None and (type(v) not in (int, float) or not math.isfinite(v) or v <= 0):
            raise GGUFError(f"{path}: metadata key {full!r} = {v!r:.60} must be a positive "
                            f"finite number")
    for key in ("bos", "eos", "padding", "unknown", "eot"):
        full = f"tokenizer.ggml.{key}_token_id"
        v = meta.get(full)
        if v is not None and (type(v) is not int or v < 0):
            raise GGUFError(f"{path}: metadata key {full!r} = {v!r:.60} must be a "
                            f"non-negative int")
    blocks = set()
    layer = re.compile(r"blk\.(\d+)\.")
    for name in header.tensors:
        m = layer.match(name)
        if m:
            blocks.add(int(m.group(1)))
    n = vals.get("block_count", [None])[0]
    if n is not None and header.tensors and (not blocks or n != max(blocks) + 1
                                             or len(blocks) != n):
        have = f"blocks {min(blocks)}..{max(blocks)} ({len(blocks)} of them)" if blocks \
            else "no blk.N tensors"
        raise GGUFError(f"{path}: metadata key '{arch}.block_count': num_hidden_layers is {n} "
                        f"but the tensors hold {have}")
    for key in ("attention.head_count_kv", "feed_forward_length"):
        if n is not None and len(vals.get(key, [0])) not in (1, n):
            raise GGUFError(f"{path}: metadata key '{arch}.{key}' lists "
                            f"{len(vals[key])} values for {n} blocks")
    # (heads dividing the embedding, KV heads dividing the heads: the family
    # spec checks those, naming the GGUF key)
    hidden = vals.get("embedding_length", [None])[0]
    emb = header.tensors.get("token_embd.weight")
    if emb is not None and hidden is not None:
        if len(emb["shape"]) != 2 or emb["shape"][1] != hidden:
            raise GGUFError(f"{path}: tensor 'token_embd.weight' of shape {emb['shape']} does "
                            f"not fit '{arch}.embedding_length' {hidden}")
        vocab = vals.get("vocab_size", [None])[0]
        if vocab is not None and vocab != emb["shape"][0]:
            raise GGUFError(f"{path}: '{arch}.vocab_size' {vocab} differs from the "
                            f"{emb['shape'][0]} rows of 'token_embd.weight'")
