# cython: language_level=3, cpp_locals=True
"""Devices and streams.

MLX runs work on streams; each device (cpu, gpu) has a default stream, and
new_stream() makes more.  Since MLX 0.31.2 streams are thread-local: every
thread has its own default streams, and an array is evaluated on the thread
that created it -- make and evaluate arrays on the same thread.
"""
cimport cython
from libcpp.vector cimport vector
from mlxcy.native cimport array as na
from mlxcy.native cimport io as nio

import contextlib

__all__ = ["Device", "Stream", "cpu", "gpu", "default_device", "set_default_device",
           "device", "default_stream", "new_stream", "set_default_stream", "stream",
           "synchronize", "is_available", "device_count", "device_info"]


@cython.final
cdef class Device:
    """A device: Device("cpu") or Device("gpu", index)."""
    cdef readonly str type
    cdef readonly int index

    def __init__(self, type, int index=0):
        if type not in ("cpu", "gpu"):
            raise ValueError(f"Device: type must be 'cpu' or 'gpu', not {type!r}")
        if index < 0:
            raise ValueError(f"Device: index must be >= 0, not {index}")
        self.type = type
        self.index = index

    def __repr__(self):
        return f"Device({self.type}, {self.index})"

    def __eq__(self, other):
        if not isinstance(other, Device):
            return NotImplemented
        return self.type == (<Device>other).type and self.index == (<Device>other).index

    def __hash__(self):
        return hash((self.type, self.index))

    def __reduce__(self):
        return (Device, (self.type, self.index))


cpu = Device("cpu")
gpu = Device("gpu")


cdef inline na.DeviceType _kind(Device d):
    return na.cpu if d.type == "cpu" else na.gpu


cdef Device _as_device(object d):
    if isinstance(d, Device):
        return <Device>d
    if isinstance(d, str):
        return Device(d)
    if isinstance(d, Stream):
        return (<Stream>d).device
    raise TypeError(f"expected a Device, 'cpu' or 'gpu', not {type(d).__name__}")


cdef Device _from_native(const na.Device& d):
    return Device("cpu" if d.type == na.cpu else "gpu", d.index)


@cython.final
cdef class Stream:
    """A stream of a device, as returned by default_stream() or new_stream()."""
    cdef readonly int index
    cdef readonly Device device

    def __init__(self, *args, **kwargs):
        raise TypeError("streams come from default_stream(device) or new_stream(device)")

    def __repr__(self):
        return f"Stream({self.device!r}, {self.index})"

    def __eq__(self, other):
        if not isinstance(other, Stream):
            return NotImplemented
        return self.index == (<Stream>other).index and self.device == (<Stream>other).device

    def __hash__(self):
        return hash((self.index, self.device))


cdef Stream _stream_from_native(const na.Stream& s):
    cdef Stream out = Stream.__new__(Stream)
    out.index = s.index
    out.device = _from_native(s.device)
    return out


def default_device():
    """The device new arrays are computed on (per process)."""
    return _from_native(na.default_device())


def set_default_device(d):
    """Make `d` (a Device, 'cpu' or 'gpu') the default device."""
    cdef Device dev = _as_device(d)
    na.set_default_device(na.Device(_kind(dev), dev.index))


@contextlib.contextmanager
def device(d):
    """`with device('cpu'):` -- make `d` the default device inside the block."""
    old = default_device()
    set_default_device(d)
    try:
        yield _as_device(d)
    finally:
        set_default_device(old)


def default_stream(d):
    """This thread's default stream on device `d`."""
    cdef Device dev = _as_device(d)
    return _stream_from_native(na.default_stream(na.Device(_kind(dev), dev.index)))


def new_stream(d):
    """A new stream on device `d`."""
    cdef Device dev = _as_device(d)
    return _stream_from_native(na.new_stream(na.Device(_kind(dev), dev.index)))


def set_default_stream(s):
    """Make stream `s` this thread's default for its device."""
    if not isinstance(s, Stream):
        raise TypeError(f"set_default_stream: expected a Stream, not {type(s).__name__}")
    cdef Stream st = s
    na.set_default_stream(na.Stream(st.index, na.Device(_kind(st.device), st.device.index)))


@contextlib.contextmanager
def stream(s):
    """`with stream(s):` -- run ops on stream `s` (and its device) inside the block."""
    if not isinstance(s, Stream):
        raise TypeError(f"stream: expected a Stream, not {type(s).__name__}")
    old_dev = default_device()
    old_stream = default_stream((<Stream>s).device)
    set_default_device((<Stream>s).device)
    set_default_stream(s)
    try:
        yield s
    finally:
        set_default_stream(old_stream)
        set_default_device(old_dev)


def synchronize(stream=None):
    """Wait (GIL released) for the work queued on `stream`, by default on the
    default device's default stream."""
    cdef na.Stream s = na.Stream(0, na.default_device())
    if stream is None:
        with nogil:
            na.synchronize()
        return
    if not isinstance(stream, Stream):
        raise TypeError(f"synchronize: expected a Stream or None, not {type(stream).__name__}")
    cdef Stream st = stream
    s = na.Stream(st.index, na.Device(_kind(st.device), st.device.index))
    with nogil:
        na.synchronize(s)


def is_available(d):
    """Whether device `d` exists in this build of MLX on this machine."""
    cdef Device dev = _as_device(d)
    return na.is_available(na.Device(_kind(dev), dev.index))


def device_count(type="gpu"):
    """How many devices of `type` ('cpu' or 'gpu') are available."""
    return na.device_count(_kind(_as_device(type)))


def device_info(d=None):
    """A dict describing device `d` (default: the default device), e.g.
    {'device_name': ..., 'architecture': ...}; keys depend on the backend."""
    cdef Device dev = default_device() if d is None else _as_device(d)
    cdef na.Device nd = na.Device(_kind(dev), dev.index)
    if not na.is_available(nd):
        raise ValueError(f"device_info: {_from_native(nd)!r} is not available")
    cdef vector[nio.MetaItem] items = nio.device_info(nd)
    cdef size_t i
    out = {}
    for i in range(items.size()):
        key = items[i].key.decode()
        out[key] = items[i].str.decode() if items[i].kind == 2 else items[i].number
    return out
