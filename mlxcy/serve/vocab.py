"""The bytes each token id stands for (logprobs' `bytes`, grammar masks)."""
from __future__ import annotations

import re

from mlxcy.tokenizer.decoders import byte_level_bytes

__all__ = ["token_bytes"]

_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def token_bytes(tok) -> list:
    """A list indexed by token id: the UTF-8 bytes the token decodes to
    (b"" for ids with no token).  Byte-level BPE tokens map through GPT-2's
    byte alphabet; SentencePiece-style ones turn U+2581 into a space and
    <0xXX> into that byte; added tokens stand for their own text."""
    tok._ensure_core()
    byte_level = tok._byte_level
    added = tok._added_ids
    out = []
    for i in range(tok.vocab_size):
        s = tok.id_to_token(i)
        if s is None:
            out.append(b"")
        elif i in added:
            out.append(s.encode("utf-8"))
        elif byte_level:
            out.append(byte_level_bytes(s))
        else:
            m = _BYTE_TOKEN.fullmatch(s) if len(s) == 6 else None
            out.append(bytes([int(m.group(1), 16)]) if m else s.replace("\u2581", " ").encode())
    return out
