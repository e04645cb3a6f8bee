"""A mutation fuzzer over mlxcy's file readers: safetensors, GGUF, tokenizer.json,
chat templates and saved sessions (KV-cache files).

Seeds are generated at run time (small, valid files built here: a tiny llama
GGUF with its tokenizer and chat template, a few safetensors files, byte-level
and SentencePiece-style tokenizer.json files, chat templates, a saved session
of a tiny model).  Each case is a seed mutated by byte-level edits (bit flips,
interesting integers over 1/2/4/8 bytes, cuts, splices, duplicated chunks) or,
for the JSON-shaped inputs, by structural edits (a node replaced by a value of
another type, a huge or negative int, a key dropped, arrays nested past the
recursion limit ...).

Cases run in a worker process that reads them one at a time; the parent waits
for each answer with a timeout, so a signal (the worker dies) or a hang (no
answer in time) is caught, the case saved under OUT/crashes/ and a fresh worker
started.  An exception other than the reader's documented mlxcy.Error class is
a finding too ("bug").

    python tools/fuzz.py --reader all --seconds 1800 --out /tmp/fuzz   # long run
    python tools/fuzz.py --reader gguf --cases 200 --seed 1            # short run

Prints one line per reader: cases, accepted, clean errors, findings, seconds.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import random
import select
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
READERS = ("safetensors", "gguf", "tokenizer", "chat", "session")

# ------------------------------------------------------------------ seeds --


def safetensors_bytes(tensors: dict, metadata=None) -> bytes:
    """A safetensors file from {name: (dtype str, shape, raw bytes)}."""
    header, blobs, off = {}, [], 0
    if metadata:
        header["__metadata__"] = metadata
    for name, (dt, shape, raw) in tensors.items():
        header[name] = {"dtype": dt, "shape": list(shape), "data_offsets": [off, off + len(raw)]}
        blobs.append(raw)
        off += len(raw)
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    return struct.pack("<Q", len(h)) + h + b"".join(blobs)


def _gstr(s) -> bytes:
    b = s.encode() if isinstance(s, str) else s
    return struct.pack("<Q", len(b)) + b


def _gvalue(v) -> tuple[int, bytes]:
    if isinstance(v, bool):
        return 7, struct.pack("<?", v)
    if isinstance(v, int):
        return 4, struct.pack("<I", v)
    if isinstance(v, float):
        return 6, struct.pack("<f", v)
    if isinstance(v, str):
        return 8, _gstr(v)
    if isinstance(v, list):
        if all(isinstance(x, str) for x in v):
            return 9, struct.pack("<IQ", 8, len(v)) + b"".join(_gstr(x) for x in v)
        if all(isinstance(x, float) for x in v):
            return 9, struct.pack("<IQ", 6, len(v)) + struct.pack(f"<{len(v)}f", *v)
        return 9, struct.pack("<IQ", 5, len(v)) + struct.pack(f"<{len(v)}i", *v)
    raise TypeError(v)


def gguf_bytes(meta: dict, tensors: dict, align=32) -> bytes:
    """A GGUF v3 file from metadata and {name: (ggml type, ggml dims, raw bytes)}."""
    out = [b"GGUF", struct.pack("<IQQ", 3, len(tensors), len(meta))]
    for k, v in meta.items():
        t, b = _gvalue(v)
        out += [_gstr(k), struct.pack("<I", t), b]
    off, blobs = 0, []
    for name, (ttype, dims, raw) in tensors.items():
        out += [_gstr(name), struct.pack("<I", len(dims)),
                struct.pack(f"<{len(dims)}Q", *dims), struct.pack("<IQ", ttype, off)]
        pad = -len(raw) % align
        blobs.append(raw + b"\0" * pad)
        off += len(raw) + pad
    head = b"".join(out)
    head += b"\0" * (-len(head) % align)
    return head + b"".join(blobs)


def _q8_0(values) -> bytes:
    import numpy as np
    x = np.asarray(values, np.float32).reshape(-1, 32)
    d = np.abs(x).max(axis=1) / 127 + 1e-8
    q = np.round(x / d[:, None]).astype(np.int8)
    return b"".join(np.float16(di).tobytes() + qi.tobytes() for di, qi in zip(d, q))


TOKENS = [chr(c) for c in range(33, 127)] + ["Ġ", "Ġt", "he", "Ġthe", "<|im_start|>",
                                             "<|im_end|>"]
MERGES = ["Ġ t", "h e", "Ġt he"]
CHAT = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
        "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def llama_meta(name, blocks, H, F, heads, kv) -> dict:
    """GGUF metadata of a tiny llama with the gpt2 tokenizer and chat template above."""
    V = len(TOKENS)
    return {"general.architecture": "llama", "general.name": name, "general.alignment": 32,
            "llama.block_count": blocks, "llama.context_length": 128,
            "llama.embedding_length": H, "llama.feed_forward_length": F,
            "llama.attention.head_count": heads, "llama.attention.head_count_kv": kv,
            "llama.attention.layer_norm_rms_epsilon": 1e-5, "llama.rope.freq_base": 10000.0,
            "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "default",
            "tokenizer.ggml.tokens": TOKENS, "tokenizer.ggml.merges": MERGES,
            "tokenizer.ggml.token_type": [1] * (V - 2) + [3, 3],
            "tokenizer.ggml.bos_token_id": V - 2, "tokenizer.ggml.eos_token_id": V - 1,
            "tokenizer.chat_template": CHAT}


# K-quant and Q5 blocks: (values, bytes, byte offsets of float16 scales)
_KBLOCKS = {12: (256, 144, (0, 2)), 13: (256, 176, (0, 2)), 14: (256, 210, (208,)),
            6: (32, 22, (0,))}


def _kquant(ttype, rows, cols, rng) -> bytes:
    """Random blocks of a K-quant/Q5 type with small finite float16 scales."""
    import numpy as np
    vals, size, scales = _KBLOCKS[ttype]
    raw = rng.integers(0, 256, (rows * cols // vals, size), dtype=np.uint8)
    for o in scales:
        raw[:, o:o + 2] = np.frombuffer(np.float16(0.01).tobytes(), np.uint8)
    return raw.tobytes()


def kquant_gguf() -> bytes:
    """One block of a tiny llama whose linear layers are Q4_K, Q5_K, Q6_K and
    Q5_0 (what the CPU loader repacks into MLX's affine layout)."""
    import numpy as np
    rng = np.random.default_rng(1)
    V, H, F = len(TOKENS), 256, 256
    f32 = lambda shape: (0, tuple(reversed(shape)),
                         (rng.standard_normal(shape) * 0.1).astype(np.float32).tobytes())
    kq = lambda ttype, r, c: (ttype, (c, r), _kquant(ttype, r, c, rng))
    p = "blk.0."
    tensors = {"token_embd.weight": f32((V, H)), "output_norm.weight": f32((H,)),
               p + "attn_norm.weight": f32((H,)), p + "ffn_norm.weight": f32((H,)),
               p + "attn_q.weight": kq(12, H, H), p + "attn_k.weight": kq(14, 128, H),
               p + "attn_v.weight": kq(6, 128, H), p + "attn_output.weight": kq(13, H, H),
               p + "ffn_gate.weight": kq(12, F, H), p + "ffn_up.weight": kq(12, F, H),
               p + "ffn_down.weight": kq(14, H, F)}
    return gguf_bytes(llama_meta("tiny-kquant", 1, H, F, 2, 1), tensors)


def tiny_gguf(quant=False, blocks=2, meta_overrides=None) -> bytes:
    """A complete tiny llama model (F32 or Q8_0 linear weights) with a gpt2
    tokenizer and a chat template; meta_overrides replaces metadata values."""
    import numpy as np
    rng = np.random.default_rng(0)
    V, H, F, heads, kv = len(TOKENS), 32, 64, 2, 1
    hd = H // heads

    def t(shape, q=False):
        x = (rng.standard_normal(shape) * 0.1).astype(np.float32)
        if q:
            return 8, tuple(reversed(shape)), _q8_0(x)
        return 0, tuple(reversed(shape)), x.tobytes()

    tensors = {"token_embd.weight": t((V, H)), "output_norm.weight": t((H,))}
    for i in range(blocks):
        p = f"blk.{i}."
        tensors.update({p + "attn_norm.weight": t((H,)), p + "ffn_norm.weight": t((H,)),
                        p + "attn_q.weight": t((H, H), quant),
                        p + "attn_k.weight": t((kv * hd, H), quant),
                        p + "attn_v.weight": t((kv * hd, H), quant),
                        p + "attn_output.weight": t((H, H), quant),
                        p + "ffn_gate.weight": t((F, H), quant),
                        p + "ffn_up.weight": t((F, H), quant),
                        p + "ffn_down.weight": t((H, F), quant)})
    meta = llama_meta("tiny", blocks, H, F, heads, kv)
    meta.update(meta_overrides or {})
    return gguf_bytes(meta, tensors)


def tokenizer_seeds() -> list[bytes]:
    from mlxcy.tokenizer.decoders import BYTE_ENCODER
    chars = [BYTE_ENCODER[b] for b in range(256)]
    vocab = {c: i for i, c in enumerate(chars)}
    for m in ("Ġ t", "h e", "Ġt he", "i n", "Ġ a"):
        a, b = m.split()
        vocab.setdefault(a + b, len(vocab))
    added = [{"id": len(vocab), "content": "<|endoftext|>", "special": True, "normalized": False,
              "lstrip": False, "rstrip": False, "single_word": False}]
    byte_level = {
        "version": "1.0", "added_tokens": added, "normalizer": {"type": "NFC"},
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": r"\s+|\p{L}+|\p{N}"}, "behavior": "Isolated",
             "invert": False},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
             "use_regex": False}]},
        "post_processor": {"type": "TemplateProcessing",
                           "single": [{"SpecialToken": {"id": "<|endoftext|>", "type_id": 0}},
                                      {"Sequence": {"id": "A", "type_id": 0}}],
                           "pair": [], "special_tokens": {"<|endoftext|>": {
                               "id": "<|endoftext|>", "ids": [len(vocab)],
                               "tokens": ["<|endoftext|>"]}}},
        "decoder": {"type": "ByteLevel"},
        "model": {"type": "BPE", "vocab": vocab, "merges": ["Ġ t", "h e", "Ġt he", "i n", "Ġ a"],
                  "ignore_merges": False}}
    spm_vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for b in range(256):
        spm_vocab[f"<0x{b:02X}>"] = len(spm_vocab)
    for t in ("▁", "a", "b", "c", "▁a", "ab", "▁ab"):
        spm_vocab[t] = len(spm_vocab)
    spm = {
        "version": "1.0", "added_tokens": [
            {"id": 0, "content": "<unk>", "special": True},
            {"id": 1, "content": "<s>", "special": True},
            {"id": 2, "content": "</s>", "special": True}],
        "normalizer": {"type": "Sequence", "normalizers": [
            {"type": "Prepend", "prepend": "▁"},
            {"type": "Replace", "pattern": {"String": " "}, "content": "▁"}]},
        "pre_tokenizer": {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "first",
                          "split": False},
        "decoder": {"type": "Sequence", "decoders": [
            {"type": "Replace", "pattern": {"String": "▁"}, "content": " "},
            {"type": "ByteFallback"}, {"type": "Fuse"},
            {"type": "Strip", "content": " ", "start": 1, "stop": 0}]},
        "model": {"type": "BPE", "vocab": spm_vocab, "merges": [["▁", "a"], ["a", "b"],
                                                                ["▁a", "b"]],
                  "byte_fallback": True, "fuse_unk": True, "unk_token": "<unk>"}}
    return [json.dumps(byte_level).encode(), json.dumps(spm).encode()]


CHAT_SNIPPETS = ["{%", "%}", "{{", "}}", "{#", "#}", "{% macro f(x) %}{{ f(x) }}{% endmacro %}",
                 "{{ f(1) }}", "{% for m in messages recursive %}{{ loop(messages) }}{% endfor %}",
                 "{{ raise_exception('no') }}", "{% set ns = namespace(a=1) %}", "ns.a",
                 "{{ messages[0]['content'] * 3 }}", "{{ (messages|length) / 0 }}", "|tojson",
                 "{{ range(5)|list }}", "loop.index", "{% if %}", "{% endif %}", "{% endfor %}",
                 "messages[9]", "{{ x.__class__ }}", "{{ 'a'|int }}", "{{ 10**10 }}",
                 "{% include 'x' %}", "{% extends 'y' %}", "{{ dict(a=1).b }}", "~", "|trim",
                 "{{ strftime_now('%Y') }}", "'\\x00'", "{% break %}", "{% continue %}"]


def chat_seeds() -> list[bytes]:
    from mlxcy.chat import builtin
    out = [CHAT.encode()]
    for fam in ("gemma3", "llama3", "qwen2", "qwen3", "smollm2", "chatml"):
        try:
            t = builtin(fam).templates
        except Exception:
            continue
        out.extend(v.encode() for v in t.values())
    return out


def tiny_model_dir(d: Path) -> Path:
    """A tiny llama checkpoint (config.json + model.safetensors, random weights)."""
    import numpy as np
    rng = np.random.default_rng(0)
    V, H, F, heads, kv, hd, L = 64, 32, 64, 2, 1, 16, 2
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": V,
           "hidden_size": H, "intermediate_size": F, "num_hidden_layers": L,
           "num_attention_heads": heads, "num_key_value_heads": kv, "head_dim": hd,
           "max_position_embeddings": 128, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
           "tie_word_embeddings": True}

    def w(*shape):
        return ("F32", shape, (rng.standard_normal(shape) * 0.1).astype(np.float32).tobytes())

    t = {"model.embed_tokens.weight": w(V, H), "model.norm.weight": w(H)}
    for i in range(L):
        p = f"model.layers.{i}."
        t.update({p + "input_layernorm.weight": w(H), p + "post_attention_layernorm.weight": w(H),
                  p + "self_attn.q_proj.weight": w(heads * hd, H),
                  p + "self_attn.k_proj.weight": w(kv * hd, H),
                  p + "self_attn.v_proj.weight": w(kv * hd, H),
                  p + "self_attn.o_proj.weight": w(H, heads * hd),
                  p + "mlp.gate_proj.weight": w(F, H), p + "mlp.up_proj.weight": w(F, H),
                  p + "mlp.down_proj.weight": w(H, F)})
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.json").write_text(json.dumps(cfg))
    (d / "model.safetensors").write_bytes(safetensors_bytes(t))
    return d


def safetensors_seeds() -> list[bytes]:
    import numpy as np
    a = np.arange(12, dtype=np.float32).reshape(3, 4)
    return [
        safetensors_bytes({"a": ("F32", (3, 4), a.tobytes()),
                           "b": ("I32", (5,), np.arange(5, dtype=np.int32).tobytes()),
                           "c": ("F16", (2, 2), np.ones(4, np.float16).tobytes()),
                           "e": ("U8", (0,), b"")}, {"format": "mlx", "k": "v"}),
        safetensors_bytes({"bf": ("BF16", (4,), b"\x80\x3f" * 4), "x": ("BOOL", (3,), b"\1\0\1"),
                           "i": ("I64", (1, 2), np.arange(2, dtype=np.int64).tobytes())}),
    ]


# -------------------------------------------------------------- mutation --

INTERESTING = [0, 1, 2, 3, 4, 7, 8, 16, 31, 32, 64, 127, 128, 255, 256, 1023, 4096, 65535, 65536,
               2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**62, 2**63 - 1, 2**63, 2**64 - 1]


def mutate_bytes(data: bytes, rng: random.Random) -> bytes:
    b = bytearray(data)
    for _ in range(rng.choice((1, 1, 1, 2, 3, 5))):
        op = rng.randrange(8)
        n = len(b)
        if n == 0:
            b += bytes([rng.randrange(256)])
            continue
        i = rng.randrange(n)
        if op == 0:                                     # bit flip
            b[i] ^= 1 << rng.randrange(8)
        elif op == 1:                                   # random byte
            b[i] = rng.randrange(256)
        elif op in (2, 3):                              # interesting integer
            width = rng.choice((1, 2, 4, 8))
            v = rng.choice(INTERESTING) + rng.choice((0, 0, 0, -1, 1))
            v %= 1 << (8 * width)
            b[i:i + width] = v.to_bytes(width, "little")
        elif op == 4:                                   # cut the tail
            del b[rng.randrange(n):]
        elif op == 5:                                   # delete a chunk
            del b[i:i + rng.randrange(1, 64)]
        elif op == 6:                                   # duplicate a chunk
            j = rng.randrange(n)
            b[j:j] = b[i:i + rng.randrange(1, 64)]
        else:                                           # splice random bytes
            b[i:i] = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 16)))
    return bytes(b)


def _random_value(rng):
    return rng.choice([None, True, False, 0, -1, 1, 2**31, 2**32, 2**63, 2**64, -2**63, 10**30,
                       1.5, -0.0, float("nan"), float("inf"), "", "x", "\u2581", "(?<", "[",
                       "\\p{Zz}", "(a*)*b", [], [1, 2], ["a", "b"], {}, {"type": "Split"},
                       {"Regex": "("}, {"String": 5}, "Sequence", "ByteLevel", "BPE"])


def mutate_json(obj, rng: random.Random):
    """Replace, delete or duplicate one random node of a JSON tree (in place
    on a copy); returns the new tree."""
    obj = json.loads(json.dumps(obj))
    nodes = []

    def walk(x, parent, key, depth):
        nodes.append((parent, key))
        if depth > 6:
            return
        if isinstance(x, dict):
            for k in list(x)[:200]:
                walk(x[k], x, k, depth + 1)
        elif isinstance(x, list):
            for k in range(min(len(x), 40)):
                walk(x[k], x, k, depth + 1)
    walk(obj, None, None, 0)
    for _ in range(rng.choice((1, 1, 2, 3))):
        parent, key = rng.choice(nodes[1:] or nodes)
        if parent is None:
            return _random_value(rng)
        try:
            r = rng.random()
            if r < 0.6:
                parent[key] = _random_value(rng)
            elif r < 0.8 and isinstance(parent, dict):
                del parent[key]
            elif isinstance(parent, list):
                parent.insert(key, parent[key])
            else:
                parent[key] = [parent[key]] if rng.random() < 0.5 else {"x": parent[key]}
        except (IndexError, KeyError):
            pass
    return obj


def nest_deep(text: str, rng: random.Random) -> str:
    """JSON text with arrays nested past Python's recursion limit after a
    random ':' (json raises RecursionError there, not ValueError)."""
    colons = [i for i, c in enumerate(text) if c == ":"]
    i = rng.choice(colons) + 1 if colons else 0
    return text[:i] + "[" * 100_000 + "]" * 100_000 + text[i:]


def mutate_text(data: bytes, rng: random.Random) -> bytes:
    s = data.decode("utf-8", "replace")
    for _ in range(rng.choice((1, 1, 2, 3))):
        i = rng.randrange(len(s) + 1)
        r = rng.random()
        if r < 0.4:
            s = s[:i] + rng.choice(CHAT_SNIPPETS) + s[i:]
        elif r < 0.6:
            s = s[:i] + s[i + rng.randrange(1, 40):]
        elif r < 0.8:
            j = rng.randrange(len(s) + 1)
            s = s[:i] + s[min(i, j):max(i, j)][:200] + s[i:]
        else:
            s = s[:i] + chr(rng.randrange(32, 0x3000)) + s[i:]
    return s.encode("utf-8", "surrogatepass")


def _st_meta_mutation(data: bytes, rng: random.Random) -> bytes:
    """A session file with one metadata JSON value mutated structurally."""
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    meta = header.get("__metadata__", {})
    key = rng.choice(sorted(meta))
    try:
        v = json.loads(meta[key])
        meta[key] = json.dumps(mutate_json(v, rng))
        if rng.random() < 0.05:
            meta[key] = nest_deep(meta[key], rng)
    except ValueError:
        meta[key] = str(_random_value(rng))
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    return struct.pack("<Q", len(h)) + h + data[8 + n:]


def mutate(reader: str, seed: bytes, rng: random.Random) -> bytes:
    r = rng.random()
    if reader == "tokenizer" and r < 0.7:
        try:
            text = json.dumps(mutate_json(json.loads(seed), rng))
        except ValueError:
            pass
        else:
            return (nest_deep(text, rng) if r < 0.035 else text).encode()
    if reader == "chat" and r < 0.8:
        return mutate_text(seed, rng)
    if reader == "session" and r < 0.5:
        return _st_meta_mutation(seed, rng)
    return mutate_bytes(seed, rng)


# ------------------------------------------------------------- targets --

class Targets:
    """What the worker runs on a case file, per reader; each returns nothing,
    raises the reader's documented class on bad input."""

    def __init__(self, work: Path):
        import mlxcy
        self.mlxcy = mlxcy
        self.work = work
        self.model = None

    def expected(self, reader):
        from mlxcy import errors as E
        return {"safetensors": E.ModelFormatError, "gguf": E.Error,
                "tokenizer": E.TokenizerError, "chat": E.ChatTemplateError,
                "session": E.SessionError}[reader]

    def safetensors(self, p):
        from mlxcy import io, transforms
        arrays, meta = io.load_safetensors(p)
        transforms.eval(list(arrays.values()))
        for a in arrays.values():
            a.free()

    def gguf(self, p):
        from mlxcy import io, transforms
        from mlxcy.chat import ChatTemplate
        from mlxcy.models.load import load_model
        from mlxcy.tokenizer import Tokenizer
        from mlxcy.errors import GGUFError
        try:
            arrays, meta = io.load_gguf(p)
        except GGUFError as e:
            # K-quant/Q5 files: MLX's reader refuses them (a clean error), the
            # model loader below repacks them
            if "MLX's GGUF reader does not support" not in str(e):
                raise
        else:
            transforms.eval(list(arrays.values()))
            for a in arrays.values():
                a.free()
        model = load_model(p)
        ids = self.mlxcy.array([[1, 2, 3]])
        transforms.eval(model(ids))
        model.close()
        tok = Tokenizer.from_gguf(p)
        tok.decode(tok.encode("hello the world 12"))
        ChatTemplate.from_gguf(p).render([{"role": "user", "content": "hi"}])

    def tokenizer(self, p):
        from mlxcy.tokenizer import Tokenizer
        tok = Tokenizer.from_file(p)
        for text in ("hello the world", "ab a 123 ü\n\n  x", ""):
            tok.decode(tok.encode(text))

    def chat(self, p):
        from mlxcy.chat import ChatTemplate
        if os.environ.get("MLXCY_FUZZ_SELFTEST"):      # tests/test_fuzz.py: a crash is caught
            os.kill(os.getpid(), signal.SIGSEGV)
        src = Path(p).read_bytes().decode("utf-8", "replace")
        ChatTemplate(src, bos_token="<s>", eos_token="</s>").render(
            [{"role": "system", "content": "sys"}, {"role": "user", "content": "hi"},
             {"role": "assistant", "content": "hello"}, {"role": "user", "content": "more"}])

    def _model(self):
        if self.model is None:
            from mlxcy.models.load import load_model
            self.model = load_model(tiny_model_dir(self.work / "tiny_model"))
        return self.model

    def session(self, p):
        from mlxcy import transforms
        from mlxcy.generation.cache_io import load_cache
        model = self._model()
        cache, ids = load_cache(p, model)
        transforms.eval(model(self.mlxcy.array([[1, 2]]), cache=cache))
        cache.free()


def session_seeds(work: Path) -> list[bytes]:
    from mlxcy import transforms
    from mlxcy.generation.cache_io import save_cache
    from mlxcy.models.load import load_model
    import mlxcy
    model = load_model(tiny_model_dir(work / "tiny_model"))
    out = []
    for n in (3, 7):
        cache = model.make_cache()
        ids = list(range(1, n + 1))
        transforms.eval(model(mlxcy.array([ids]), cache=cache))
        p = work / f"session{n}.safetensors"
        save_cache(p, cache, ids)
        out.append(p.read_bytes())
        cache.free()
    model.close()
    return out


def seeds(reader: str, work: Path) -> list[bytes]:
    if reader == "safetensors":
        return safetensors_seeds()
    if reader == "gguf":
        return [tiny_gguf(False), tiny_gguf(True, blocks=1), kquant_gguf()]
    if reader == "tokenizer":
        return tokenizer_seeds()
    if reader == "chat":
        return chat_seeds()
    if reader == "session":
        return session_seeds(work)
    raise ValueError(reader)


SUFFIX = {"safetensors": ".safetensors", "gguf": ".gguf", "tokenizer": ".json",
          "chat": ".jinja", "session": ".safetensors"}

# -------------------------------------------------------------- worker --


def worker(reader: str, work: str) -> None:
    """Read case paths from stdin, answer one line each: ok / clean / bug ..."""
    sys.setrecursionlimit(3000)
    t = Targets(Path(work))
    expected = t.expected(reader)
    fn = getattr(t, reader)
    out = sys.stdout
    out.write("ready\n")
    out.flush()
    for line in sys.stdin:
        p = line.strip()
        try:
            fn(p)
            ans = "ok"
        except expected as e:
            msg = str(e)
            ans = "clean" if msg else "bug empty message"
        except (MemoryError, FileNotFoundError) as e:
            ans = f"bug {type(e).__name__}: {e}"
        except BaseException as e:         # noqa: BLE001 -- every other class is a finding
            ans = f"bug {type(e).__name__}: {str(e)[:300]}"
        out.write(ans.replace("\n", " ") + "\n")
        out.flush()


class Pool:
    """One worker process, restarted after a crash or a hang."""

    def __init__(self, reader, work, timeout):
        self.reader, self.work, self.timeout = reader, work, timeout
        self.proc = None

    def start(self):
        # the worker imports the mlxcy this process would (an install or an in-place build)
        pkg = os.path.dirname(os.path.dirname(importlib.util.find_spec("mlxcy").origin))
        env = dict(os.environ, PYTHONPATH=pkg + os.pathsep + os.environ.get("PYTHONPATH", ""))
        self.proc = subprocess.Popen(
            [sys.executable, "-u", str(Path(__file__).resolve()), "--worker", self.reader,
             "--work", str(self.work)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
            text=True, env=env, cwd=str(self.work))
        line = self._read(120)
        if line != "ready":
            raise RuntimeError(f"fuzz worker for {self.reader} did not start: {line!r}")

    def _read(self, timeout):
        r, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not r:
            return None
        return self.proc.stdout.readline().strip()

    def run(self, path) -> str:
        if self.proc is None or self.proc.poll() is not None:
            self.start()
        try:
            self.proc.stdin.write(str(path) + "\n")
            self.proc.stdin.flush()
        except BrokenPipeError:
            pass
        ans = self._read(self.timeout)
        if ans is None:
            self.kill()
            return f"hang (no answer in {self.timeout} s)"
        if ans == "":
            rc = self.proc.wait()
            self.proc = None
            name = signal.Signals(-rc).name if rc < 0 else f"exit {rc}"
            return f"crash {name}"
        return ans

    def kill(self):
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None


def fuzz(reader: str, *, seconds: float | None = None, cases: int | None = None, seed=0,
         out: Path | None = None, timeout: float = 20.0, log=None) -> dict:
    """Run one reader's fuzz loop; returns counts and the findings."""
    work = Path(tempfile.mkdtemp(prefix=f"mlxcy-fuzz-{reader}-"))
    rng = random.Random(f"{reader}:{seed}")
    stats = {"reader": reader, "cases": 0, "ok": 0, "clean": 0, "findings": []}
    t0 = time.time()
    pool = Pool(reader, work, timeout)
    try:
        corpus = seeds(reader, work)
        case = work / f"case{SUFFIX[reader]}"
        while (cases is None or stats["cases"] < cases) and \
                (seconds is None or time.time() - t0 < seconds):
            data = corpus[rng.randrange(len(corpus))]
            if stats["cases"] >= len(corpus):
                data = mutate(reader, data, rng)
            case.write_bytes(data)
            ans = pool.run(case)
            stats["cases"] += 1
            if ans in ("ok", "clean"):
                stats[ans] += 1
                continue
            stats["findings"].append(ans)
            if out is not None:
                d = Path(out) / "crashes" / reader
                d.mkdir(parents=True, exist_ok=True)
                k = len(stats["findings"])
                (d / f"{k:04d}{SUFFIX[reader]}").write_bytes(data)
                (d / f"{k:04d}.txt").write_text(ans + "\n")
            if log:
                log(f"[{reader}] case {stats['cases']}: {ans}")
    finally:
        pool.kill()
        shutil.rmtree(work, ignore_errors=True)
    stats["seconds"] = round(time.time() - t0, 1)
    return stats


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reader", default="all", help="one of %s, or all" % ", ".join(READERS))
    ap.add_argument("--seconds", type=float, default=None, help="time budget per reader")
    ap.add_argument("--cases", type=int, default=None, help="case budget per reader")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--timeout", type=float, default=20.0, help="seconds before a case is a hang")
    ap.add_argument("--out", default=None, help="folder for findings (crashes/<reader>/)")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--work", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.worker:
        return worker(a.worker, a.work)
    if a.seconds is None and a.cases is None:
        a.cases = 200
    readers = READERS if a.reader == "all" else a.reader.split(",")
    bad = 0
    for r in readers:
        s = fuzz(r, seconds=a.seconds, cases=a.cases, seed=a.seed, out=a.out, timeout=a.timeout,
                 log=lambda m: print(m, flush=True))
        bad += len(s["findings"])
        print(f"{r}: {s['cases']} cases, {s['ok']} accepted, {s['clean']} clean errors, "
              f"{len(s['findings'])} findings, {s['seconds']} s", flush=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.path.append(str(ROOT))      # an in-place build in this checkout, when nothing is installed
    sys.exit(main())
