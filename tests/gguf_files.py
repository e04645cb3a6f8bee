"""GGUF files for the tests, written with the gguf package (llama.cpp's own
writer): metadata by Python type, float or quantized tensors."""
import numpy as np
from gguf import GGUFWriter, quants


def write_gguf(path, arch, tensors, meta, truncate=0):
    """Write `path`: meta {key: str | bool | int (uint32) | float (float32) |
    list}, tensors {name: array, or (array, GGMLQuantizationType or None)};
    truncate: drop that many bytes from the end."""
    w = GGUFWriter(str(path), arch)
    for k, v in meta.items():
        if isinstance(v, str):
            w.add_string(k, v)
        elif isinstance(v, bool):
            w.add_bool(k, v)
        elif isinstance(v, int):
            w.add_uint32(k, v)
        elif isinstance(v, float):
            w.add_float32(k, v)
        else:
            w.add_array(k, v)
    for name, t in tensors.items():
        data, qtype = t if isinstance(t, tuple) else (t, None)
        if qtype is None:
            w.add_tensor(name, data)
        else:
            q = quants.quantize(data, qtype)
            w.add_tensor(name, q, raw_shape=q.shape, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    if truncate:
        data = path.read_bytes()
        path.write_bytes(data[:-truncate])
    return path


def tiny_gemma(rng, layers=2, h=32, hd=16, ffn=64, vocab=50):
    """(tensors, metadata) of a tiny Gemma 3 in llama.cpp's names: f16
    matrices, f32 norms stored as 1 + w."""
    t = {"token_embd.weight": rng.standard_normal((vocab, h)).astype(np.float32),
         "output_norm.weight": (1 + 0.1 * rng.standard_normal(h)).astype(np.float32)}
    for i in range(layers):
        p = f"blk.{i}."
        t.update({p + "attn_q.weight": rng.standard_normal((2 * hd, h)).astype(np.float16),
                  p + "attn_k.weight": rng.standard_normal((hd, h)).astype(np.float16),
                  p + "attn_v.weight": rng.standard_normal((hd, h)).astype(np.float16),
                  p + "attn_output.weight": rng.standard_normal((h, 2 * hd)).astype(np.float16),
                  p + "ffn_gate.weight": rng.standard_normal((ffn, h)).astype(np.float16),
                  p + "ffn_up.weight": rng.standard_normal((ffn, h)).astype(np.float16),
                  p + "ffn_down.weight": rng.standard_normal((h, ffn)).astype(np.float16)})
        for n, d in (("attn_norm", h), ("post_attention_norm", h), ("ffn_norm", h),
                     ("post_ffw_norm", h), ("attn_q_norm", hd), ("attn_k_norm", hd)):
            t[p + n + ".weight"] = (1 + 0.1 * rng.standard_normal(d)).astype(np.float32)
    meta = {"gemma3.context_length": 128, "gemma3.embedding_length": h,
            "gemma3.block_count": layers, "gemma3.feed_forward_length": ffn,
            "gemma3.attention.head_count": 2, "gemma3.attention.head_count_kv": 1,
            "gemma3.attention.key_length": hd, "gemma3.attention.value_length": hd,
            "gemma3.attention.layer_norm_rms_epsilon": 1e-6, "gemma3.rope.freq_base": 1e6,
            "gemma3.attention.sliding_window": 16}
    return t, meta
