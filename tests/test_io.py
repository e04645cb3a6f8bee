"""mlxcy.io against independent readers and writers: the `safetensors`
package (and the raw file format), the `gguf` package, and numpy's .npy."""
import json
import struct

import ml_dtypes
import numpy as np
import pytest
from gguf import GGMLQuantizationType as QT
from gguf import quants
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

from gguf_files import write_gguf

import mlxcy as mc
from mlxcy import io as IO

RNG = np.random.default_rng(7)

# Every dtype safetensors can hold (MLX's writer refuses float64).
DTYPES = [np.bool_, np.uint8, np.uint16, np.uint32, np.uint64, np.int8, np.int16,
          np.int32, np.int64, np.float16, np.float32, ml_dtypes.bfloat16, np.complex64]

# MLX's safetensors writer rejects float64; on a GPU, evaluating the array
# for the write fails first ("float64 is not supported on the GPU").
F64_SAVE_ERROR = r"\[save_safetensors\] received invalid dtype|float64 is not supported on the GPU"


def sample(dt, shape=(3, 5)):
    dt = np.dtype(dt)
    if dt == np.bool_:
        return RNG.random(shape) > 0.5
    if dt.kind in "ui":
        info = np.iinfo(dt)
        return RNG.integers(info.min, info.max, size=shape, dtype=dt, endpoint=True)
    if dt.kind == "c":
        return (RNG.normal(size=shape) + 1j * RNG.normal(size=shape)).astype(dt)
    return (RNG.normal(size=shape) * 100).astype(dt)


def raw_safetensors(path):
    """Parse a .safetensors file by hand: {name: (dtype, shape, bytes)}, metadata."""
    data = open(path, "rb").read()
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + n])
    meta = header.pop("__metadata__", {})
    body = data[8 + n:]
    return {k: (v["dtype"], v["shape"], body[v["data_offsets"][0]:v["data_offsets"][1]])
            for k, v in header.items()}, meta


def test_safetensors_round_trip_every_dtype(tmp_path):
    arrays = {f"t_{np.dtype(dt).name}": sample(dt) for dt in DTYPES}
    arrays["scalar"] = np.float32(2.5).reshape(())
    arrays["empty"] = np.zeros((0, 4), np.int32)
    path = tmp_path / "all.safetensors"
    meta = {"format": "mlx", "note": "ünïcode ✓"}
    IO.save_safetensors(path, {k: mc.array(v) for k, v in arrays.items()}, meta)

    loaded, lmeta = IO.load_safetensors(path)
    assert lmeta == meta and sorted(loaded) == sorted(arrays)
    for k, v in arrays.items():
        assert loaded[k].dtype == mc.dtype(v.dtype), k
        assert loaded[k].shape == v.shape
        np.testing.assert_array_equal(loaded[k].numpy(), v)

    # The safetensors package reads our file.
    ref = load_file(str(path))
    for k, v in arrays.items():
        if v.dtype != ml_dtypes.bfloat16:
            np.testing.assert_array_equal(ref[k], v)
    with safe_open(str(path), framework="numpy") as f:
        assert f.metadata() == meta
    # bfloat16 checked byte for byte against the file format itself.
    raw, rmeta = raw_safetensors(path)
    dt, shape, data = raw["t_bfloat16"]
    assert dt == "BF16" and shape == [3, 5] and rmeta == meta
    assert data == arrays["t_bfloat16"].tobytes()


def test_we_read_files_written_by_safetensors(tmp_path):
    arrays = {"a": sample(np.float32, (4, 2)), "b.c": sample(np.int64, (7,)),
              "f16": sample(np.float16, (2, 2, 2))}
    path = str(tmp_path / "theirs.safetensors")
    save_file(arrays, path, metadata={"k": "v"})
    loaded, meta = IO.load_safetensors(path)
    assert meta == {"k": "v"}
    for k, v in arrays.items():
        np.testing.assert_array_equal(loaded[k].numpy(), v)


def test_save_safetensors_validates_and_saves_views(tmp_path):
    x = mc.array(np.arange(12, dtype=np.float32).reshape(3, 4))
    IO.save_safetensors(tmp_path / "v.safetensors", {"t": x.T, "s": x[1:, ::2]})
    got = load_file(str(tmp_path / "v.safetensors"))
    np.testing.assert_array_equal(got["t"], x.numpy().T)
    np.testing.assert_array_equal(got["s"], x.numpy()[1:, ::2])
    with pytest.raises(TypeError, match="names must be str"):
        IO.save_safetensors(tmp_path / "b.safetensors", {1: x})
    with pytest.raises(TypeError, match="metadata"):
        IO.save_safetensors(tmp_path / "b.safetensors", {"x": x}, {"k": 1})
    with pytest.raises((RuntimeError, ValueError), match=F64_SAVE_ERROR):
        IO.save_safetensors(tmp_path / "b.safetensors", {"x": mc.array(x.numpy(), dtype=mc.float64)})


def unpack(w, bits):
    """MLX's packed uint32 quantized values -> uint8 values, low bits first."""
    b = w.view(np.uint8)
    if bits == 8:
        return b
    return np.stack([b & 0xF, b >> 4], axis=-1).reshape(w.shape[0], -1)


def dequant(w, scales, biases, bits, group=32):
    q = unpack(w, bits).astype(np.float32)
    q = q.reshape(q.shape[0], -1, group)
    out = q * scales.astype(np.float32)[..., None] + biases.astype(np.float32)[..., None]
    return out.reshape(q.shape[0], -1)


def test_gguf_tensors_and_metadata(tmp_path):
    x = RNG.normal(size=(4, 64)).astype(np.float32)
    tensors = {"f32": (x, None), "f16": (x.astype(np.float16), None),
               "blk.0.q8.weight": (x, QT.Q8_0), "q4_0": (x, QT.Q4_0),
               "blk.1.q4_1.weight": (x, QT.Q4_1)}
    kv = {"tok.name": "hello ✓", "tok.count": 7, "tok.scale": 1.5, "tok.flag": True,
          "tok.ids": [1, 2, 3], "tok.words": ["a", "bc", "déf"]}
    path = tmp_path / "m.gguf"
    write_gguf(path, "llama", tensors, kv)
    arrays, meta = IO.load_gguf(path)

    np.testing.assert_array_equal(arrays["f32"].numpy(), x)
    np.testing.assert_array_equal(arrays["f16"].numpy(), x.astype(np.float16))
    # Quantized tensors: (packed weights, scales, biases), group size 32.
    for name, prefix, qtype, bits in [("blk.0.q8.weight", "blk.0.q8", QT.Q8_0, 8),
                                      ("q4_0", "q4_0", QT.Q4_0, 4),
                                      ("blk.1.q4_1.weight", "blk.1.q4_1", QT.Q4_1, 4)]:
        w, s, b = arrays[name], arrays[prefix + ".scales"], arrays[prefix + ".biases"]
        assert w.dtype == mc.uint32 and w.shape == (4, 64 * bits // 32)
        assert s.shape == b.shape == (4, 2)
        ref = quants.dequantize(quants.quantize(x, qtype), qtype)
        ours = dequant(w.numpy(), s.numpy(), b.numpy(), bits)
        np.testing.assert_allclose(ours, ref, rtol=1e-3, atol=1e-3)
        # and through MLX's own dequantize, when the ops module has it
        if hasattr(mc, "dequantize"):
            d = mc.dequantize(w, s, b, group_size=32, bits=bits)
            np.testing.assert_allclose(d.numpy(), ref, rtol=1e-3, atol=1e-3)
    assert len(arrays) == 2 + 3 * 3

    assert meta["general.architecture"] == "llama"
    assert meta["tok.name"] == "hello ✓"
    assert meta["tok.count"] == 7 and isinstance(meta["tok.count"], int)
    assert meta["tok.scale"] == 1.5 and meta["tok.flag"] is True
    assert meta["tok.words"] == ["a", "bc", "déf"]
    assert isinstance(meta["tok.ids"], mc.Array) and meta["tok.ids"].tolist() == [1, 2, 3]


@pytest.mark.parametrize("dt", [np.float32, np.float16, np.int32, np.uint8, np.bool_,
                                np.int64, np.complex64])
def test_npy_interop(tmp_path, dt):
    x = sample(dt, (3, 4))
    np.save(tmp_path / "theirs.npy", x)
    ours = IO.load_npy(tmp_path / "theirs.npy")
    assert ours.dtype == mc.dtype(x.dtype)
    np.testing.assert_array_equal(ours.numpy(), x)
    IO.save_npy(tmp_path / "ours.npy", mc.array(x).T)        # a strided view
    np.testing.assert_array_equal(np.load(tmp_path / "ours.npy"), x.T)


def test_load_and_save_dispatch_on_extension(tmp_path):
    x = mc.array([[1.0, 2.0], [3.0, 4.0]])
    IO.save(tmp_path / "a.npy", x)
    np.testing.assert_array_equal(IO.load(tmp_path / "a.npy").numpy(), x.numpy())
    IO.save(str(tmp_path / "b.safetensors"), {"x": x}, {"m": "1"})
    d, meta = IO.load(tmp_path / "b.safetensors", return_metadata=True)
    assert meta == {"m": "1"} and d["x"].tolist() == x.tolist()
    assert list(IO.load(tmp_path / "b.safetensors")) == ["x"]
    write_gguf(tmp_path / "c.gguf", "llama", {"t": (np.ones((2, 32), np.float32), None)}, {})
    assert IO.load(tmp_path / "c.gguf")["t"].shape == (2, 32)
    (tmp_path / "a.bin").write_bytes(b"\0" * 16)
    with pytest.raises(ValueError, match="format"):
        IO.load(tmp_path / "a.bin")
    with pytest.raises(ValueError, match="metadata"):
        IO.save(tmp_path / "a.npy", x, {"m": "1"})
