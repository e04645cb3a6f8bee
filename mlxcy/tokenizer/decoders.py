"""Decoders from tokenizer.json: each maps a list of token strings to a list
of strings, chained like `tokenizers` does; the results are concatenated."""
from __future__ import annotations

import re

from .errors import TokenizerError


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte alphabet: printable Latin-1 bytes map to themselves, the
    rest to code points from 256 upward, in byte order."""
    keep = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


BYTE_ENCODER = bytes_to_unicode()
BYTE_DECODER = {c: b for b, c in BYTE_ENCODER.items()}
_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def byte_level_bytes(token: str) -> bytes:
    """A byte-level token's bytes; a token using other characters (an added
    token) stands for its own UTF-8, as in `tokenizers`."""
    try:
        return bytes(BYTE_DECODER[c] for c in token)
    except KeyError:
        return token.encode("utf-8")


def _byte_level(tokens):
    return [b"".join(byte_level_bytes(t) for t in tokens).decode("utf-8", "replace")]


def _byte_fallback(tokens):
    out, pending = [], []

    def flush():
        if pending:
            raw = bytes(pending)
            try:
                out.append(raw.decode("utf-8"))
            except UnicodeDecodeError:
                out.extend("\ufffd" * len(raw))   # one replacement per byte
            pending.clear()
    for t in tokens:
        m = _BYTE_TOKEN.fullmatch(t) if len(t) == 6 else None
        if m:
            pending.append(int(m.group(1), 16))
        else:
            flush()
            out.append(t)
    flush()
    return out


def _strip(content: str, left: int, right: int):
    def f(tokens):
        out = []
        for t in tokens:
            a, b = 0, len(t)
            while a < min(left, len(t)) and t[a] == content:
                a += 1
            while b > a and len(t) - b < right and t[b - 1] == content:
                b -= 1
            out.append(t[a:b])
        return out
    return f


def _metaspace(spec):
    rep = spec.get("replacement", "\u2581")
    scheme = spec.get("prepend_scheme") or ("always" if spec.get("add_prefix_space", True)
                                           else "never")

    def f(tokens):
        out = []
        for i, t in enumerate(tokens):
            t = t.replace(rep, " ")
            if i == 0 and scheme != "never" and t.startswith(" "):
                t = t[1:]
            out.append(t)
        return out
    return f


def build_decoder(spec: dict | None):
    """A function list[str] -> list[str] for the tokenizer.json decoder."""
    from .normalizers import str_field
    if spec is None:
        return lambda tokens: tokens
    if not isinstance(spec, dict):
        raise TokenizerError(f"decoder must be a JSON object, not {type(spec).__name__}")
    kind = spec.get("type")
    if kind == "Sequence":
        if not isinstance(spec.get("decoders", []), list):
            raise TokenizerError("decoder.decoders must be a list")
        steps = [build_decoder(s) for s in spec.get("decoders", [])]

        def seq(tokens):
            for f in steps:
                tokens = f(tokens)
            return tokens
        return seq
    if kind == "ByteLevel":
        return _byte_level
    if kind == "ByteFallback":
        return _byte_fallback
    if kind == "Fuse":
        return lambda tokens: ["".join(tokens)]
    if kind == "Strip":
        start, stop = spec.get("start", 0), spec.get("stop", 0)
        if type(start) is not int or type(stop) is not int or min(start, stop) < 0:
            raise TokenizerError("Strip decoder: 'start' and 'stop' must be ints >= 0")
        return _strip(str_field(spec, "content", " ", "Strip decoder"), start, stop)
    if kind == "Replace":
        from .normalizers import _pattern
        lit, rx = _pattern(spec, "Replace decoder")
        content = str_field(spec, "content", "", "Replace decoder")
        if rx is not None:
            return lambda tokens: [rx.sub(content.replace("\\", "\\\\"), t) for t in tokens]
        return lambda tokens: [t.replace(lit, content) for t in tokens]
    if kind == "Metaspace":
        str_field(spec, "replacement", "\u2581", "Metaspace decoder")
        return _metaspace(spec)
    raise TokenizerError(f"unsupported decoder type {kind!r} in tokenizer.json")
