# cython: language_level=3, cpp_locals=True
"""Reading and writing arrays: safetensors, GGUF, and .npy.

Loaded safetensors and .npy arrays are lazy, as in MLX: the data is read when
they are first evaluated (MLX keeps the file open until then).

GGUF tensors in Q4_0, Q4_1 and Q8_0 arrive already converted to MLX's affine
quantized format with group size 32: `name` holds the packed uint32 weights
(4 or 8 bits per value), and `<prefix>.scales` / `<prefix>.biases` (float16,
one per group of 32) sit beside it, where <prefix> is `name` less a trailing
".weight" (so "blk.0.attn_q.weight" gives "blk.0.attn_q.scales").  Dequantize
with w = scale * q + bias.  Other quantized GGUF types are converted to float16
by MLX.
"""
from libcpp.string cimport string
from libcpp.vector cimport vector

from mlxcy.core cimport Array, wrap, handle, to_array
from mlxcy.native cimport array as na
from mlxcy.native cimport io as nio
from mlxcy.native cimport transforms as ntr

import math
import os
from contextlib import contextmanager

from mlxcy.errors import GGUFError, ModelFormatError
from mlxcy import gguf_reader as _gguf
from mlxcy import safetensors_header as _st

__all__ = ["load_safetensors", "save_safetensors", "load_gguf", "load_npy", "save_npy",
           "load", "save"]


cdef string _readable(object path, str fn) except *:
    """The path as bytes, after checking it opens -- so a missing or unreadable
    file raises the usual OSError (FileNotFoundError, ...) naming it."""
    p = os.fspath(path)
    if os.path.isdir(p):
        raise IsADirectoryError(21, f"{fn}: is a directory", p)
    with open(p, "rb"):
        pass
    return os.fsencode(p)


cdef string _writable(object path, str fn) except *:
    p = os.fspath(path)
    parent = os.path.dirname(os.path.abspath(p))
    if not os.path.isdir(parent):
        raise FileNotFoundError(2, f"{fn}: no such directory {parent!r}", p)
    return os.fsencode(p)


cdef _format_error(Exception e, object path, type cls):
    """MLX's exception on reading a file, as `cls` (a ModelFormatError) naming it."""
    msg = str(e)
    p = os.fspath(path)
    raise cls(msg if str(p) in msg else f"{p}: {msg}") from None


cdef str _temp_beside(str final):
    """A fresh name in final's folder, keeping its extension (MLX appends one
    when it is missing): a write goes there, then is renamed over final, so a
    failed write leaves no partial file."""
    d, base = os.path.split(final)
    stem, ext = os.path.splitext(base)
    return os.path.join(d, f".{stem}.{os.getpid()}.{os.urandom(4).hex()}.tmp{ext}")


cdef _with_path(Exception e, object path):
    """Re-raise MLX's exception with the file named, keeping its message and type."""
    msg = str(e)
    p = os.fspath(path)
    if str(p) in msg:
        raise e
    raise type(e)(f"{msg} (file: {p})") from None


@contextmanager
def _replacing(path, str ext):
    """Write a file atomically: yields a fresh name beside `path` (`ext`
    appended when missing, as MLX does) to write to; when the block ends the
    file replaces path's, and when it fails the file is removed and MLX's
    error names `path`, not the temporary name."""
    final = os.fsdecode(os.fspath(path))
    if not final.endswith(ext):
        final += ext
    tmp = _temp_beside(final)
    try:
        yield tmp
        os.replace(tmp, final)
    except (RuntimeError, ValueError) as e:
        _with_path(type(e)(str(e).replace(tmp, final)), path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


cdef str _text(const string& s):
    return s.decode("utf-8", "replace")


cdef dict _tensors(nio.LoadResult* r):
    cdef size_t i
    names = [_text(r.tensors.names[i]) for i in range(r.tensors.names.size())]
    out = {}
    for i in sorted(range(len(names)), key=names.__getitem__):
        out[names[i]] = wrap(new na.array(r.tensors.arrays[i]))
    return out


def load_safetensors(path):
    """Read a .safetensors file: (dict name -> Array, metadata dict str -> str)."""
    cdef string p = _readable(path, "load_safetensors")
    cdef nio.LoadResult* r = NULL
    _st.read_header(path)           # checked before MLX's reader sees it
    try:
        r = nio.load_safetensors(p)
    except (RuntimeError, ValueError) as e:
        _format_error(e, path, ModelFormatError)
    cdef size_t i
    try:
        meta = {_text(r.meta[i].key): _text(r.meta[i].str) for i in range(r.meta.size())}
        return _tensors(r), meta
    finally:
        del r


cdef vector[na.array] _named_arrays(dict arrays, vector[string]& names, str fn) except *:
    cdef vector[na.array] v = vector[na.array]()
    cdef Array a
    for k, x in arrays.items():
        if not isinstance(k, str):
            raise TypeError(f"{fn}: array names must be str, not {type(k).__name__} ({k!r})")
        try:
            a = x if type(x) is Array else to_array(x)
        except (TypeError, ValueError) as e:
            raise TypeError(f"{fn}: array {k!r}: {e}") from None
        names.push_back(k.encode())
        v.push_back(handle(a)[0])
    return v


def save_safetensors(path, arrays, metadata=None):
    """Write a dict name -> Array (anything mlxcy.array accepts) to a
    .safetensors file, with an optional dict str -> str of metadata.  As in
    MLX, ".safetensors" is appended to a path without that extension."""
    fn = "save_safetensors"
    if not isinstance(arrays, dict):
        raise TypeError(f"{fn}: arrays must be a dict of name -> Array, not "
                        f"{type(arrays).__name__}")
    cdef vector[string] names = vector[string]()
    cdef vector[string] keys = vector[string]()
    cdef vector[string] values = vector[string]()
    cdef vector[na.array] v = _named_arrays(arrays, names, fn)
    for k, val in (metadata or {}).items():
        if not isinstance(k, str) or not isinstance(val, str):
            raise TypeError(f"{fn}: metadata must map str to str; got {k!r}: {val!r}")
        keys.push_back(k.encode())
        values.push_back(val.encode())
    _writable(path, fn)
    cdef string p
    with _replacing(path, ".safetensors") as tmp:
        p = os.fsencode(tmp)
        with nogil:
            ntr.eval(v)
            nio.save_safetensors(p, names, v, keys, values)


cdef object _meta_value(nio.LoadResult* r, size_t i):
    cdef int kind = r.meta[i].kind
    cdef Array a
    if kind == 1:
        a = wrap(new na.array(r.meta_arrays[r.meta[i].index]))
        return a.item() if a.ndim == 0 else a
    if kind == 2:
        return _text(r.meta[i].str)
    if kind == 3:
        return [_text(s) for s in r.meta[i].strs]
    return None


def load_gguf(path):
    """Read a GGUF file: (dict name -> Array, metadata dict).

    Metadata values are str, list of str, Python int/float/bool for scalars,
    or an Array for numeric arrays.  See the module docstring for how
    quantized tensors arrive."""
    cdef string p = _readable(path, "load_gguf")
    cdef nio.LoadResult* r = NULL
    # MLX's reader trusts the header (malformed files crash it): mlxcy's
    # checked reader goes first, and only types MLX handles pass.
    h = _gguf.read_header(path)
    for name, t in h.tensors.items():
        if t["type"] not in _gguf.MLX_TYPES:
            raise GGUFError(f"{os.fspath(path)}: tensor {name!r} has ggml type "
                            f"{_gguf.TYPE_NAMES.get(t['type'], t['type'])}, which MLX's "
                            f"GGUF reader does not support")
    try:
        with nogil:
            r = nio.load_gguf(p)
    except (RuntimeError, ValueError) as e:
        _format_error(e, path, GGUFError)
    cdef size_t i
    try:
        meta = {_text(r.meta[i].key): _meta_value(r, i) for i in range(r.meta.size())}
        return _tensors(r), meta
    finally:
        del r


def _check_npy(path):
    """The .npy header, checked before MLX's reader sees the file: MLX reads
    the data only when the array is evaluated (a short file then fails an
    evaluation, which MLX 0.32.4 may not recover from: tests/test_errors.py)
    and parses the shape with std::stoi (past 2**31: an IndexError naming
    nothing).  Raises ModelFormatError naming the file."""
    from numpy.lib import format as npf
    p = os.fspath(path)
    with open(p, "rb") as f:
        try:
            version = npf.read_magic(f)
            if version not in ((1, 0), (2, 0)):
                raise ValueError(f"format version {version[0]}.{version[1]} (MLX reads 1.0 "
                                 f"and 2.0)")
            read = npf.read_array_header_1_0 if version == (1, 0) else npf.read_array_header_2_0
            shape, _, dtype = read(f, max_header_size=1 << 20)
        except Exception as e:   # (numpy parses the header's dict with ast and tokenize)
            raise ModelFormatError(f"{p}: not a .npy file MLX can read ({e})") from None
        offset = f.tell()
    if dtype.fields is not None or not (dtype.kind in "biuf" or (dtype.kind, dtype.itemsize)
                                        in (("c", 8), ("V", 2))):
        raise ModelFormatError(f"{p}: dtype {dtype.str} is not one MLX reads (bool, ints, "
                               f"floats, complex64, bfloat16 as '<V2')")
    if any(d < 0 or d > 2**31 - 1 for d in shape):
        raise ModelFormatError(f"{p}: shape {shape} has a dimension outside [0, 2**31)")
    n = dtype.itemsize * math.prod(shape)
    have = os.path.getsize(p) - offset
    if have < n:
        raise ModelFormatError(f"{p}: the header's shape {shape} of {dtype.str} needs {n} "
                               f"bytes of data, the file holds {have} (truncated?)")


def load_npy(path):
    """Read a .npy file into an Array; a header MLX cannot read, or data shorter
    than it says, raises ModelFormatError naming the file."""
    cdef string p = _readable(path, "load_npy")
    _check_npy(path)
    try:
        return wrap(nio.load_npy(p))
    except (RuntimeError, ValueError) as e:
        _with_path(e, path)


def save_npy(path, array):
    """Write one Array to a .npy file (".npy" is appended when missing, as in MLX)."""
    cdef Array a = array if type(array) is Array else to_array(array)
    _writable(path, "save_npy")
    cdef string p
    cdef na.array* h = handle(a)
    with _replacing(path, ".npy") as tmp:
        p = os.fsencode(tmp)
        with nogil:
            nio.save_npy(p, h[0])


cdef str _kind(object path):
    ext = os.path.splitext(os.fspath(path))[1].lower()
    return {".npy": "npy", ".safetensors": "safetensors", ".gguf": "gguf"}.get(ext, "")


def load(path, return_metadata=False):
    """Load by extension: .npy -> Array; .safetensors and .gguf -> dict of
    Arrays, or (dict, metadata) with return_metadata=True."""
    _readable(path, "load")
    kind = _kind(path)
    if kind == "npy":
        if return_metadata:
            raise ValueError("load: .npy files have no metadata")
        return load_npy(path)
    if kind == "safetensors" or kind == "gguf":
        arrays, meta = (load_safetensors if kind == "safetensors" else load_gguf)(path)
        return (arrays, meta) if return_metadata else arrays
    raise ValueError(f"load: cannot tell the format of {os.fspath(path)!r}; "
                     f"use a .npy, .safetensors or .gguf extension")


def save(path, obj, metadata=None):
    """Save by extension (.npy or .safetensors); without one, an Array goes to
    .npy and a dict to .safetensors."""
    kind = _kind(path)
    if not kind:
        kind = "safetensors" if isinstance(obj, dict) else "npy"
    if kind == "npy":
        if metadata is not None:
            raise ValueError("save: .npy files cannot hold metadata")
        return save_npy(path, obj)
    if kind == "safetensors":
        return save_safetensors(path, obj, metadata)
    raise ValueError(f"save: writing {kind} files is not supported")
