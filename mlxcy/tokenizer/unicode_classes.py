"""The code point classes the pre-tokenizer regexes use: \\p{L}, \\p{N} and \\s.

`tokenizers` matches them with Oniguruma, whose tables are Unicode 16.0, while
Python 3.11's `unicodedata` is Unicode 14.0. With the `regex` module installed
(it carries newer tables and the Age property) the table is built from it,
leaving out characters assigned after UNICODE_VERSION so both agree; without
it, `unicodedata` is used (differences only on characters new since 14.0).
"""
from __future__ import annotations

import unicodedata

UNICODE_VERSION = "16.0"
NCP = 0x110000
LETTER, NUMBER, SPACE = 1, 2, 4

# The White_Space property (what \s matches in Oniguruma's Unicode mode).
_WHITE_SPACE = [*range(0x09, 0x0E), 0x20, 0x85, 0xA0, 0x1680, *range(0x2000, 0x200B),
                0x2028, 0x2029, 0x202F, 0x205F, 0x3000]

_table: bytes | None = None


def _all_chars() -> str:
    # Surrogates cannot be matched by a regex on str meaningfully; keep them
    # as placeholders so string index == code point.
    return "".join(chr(c) if not 0xD800 <= c < 0xE000 else "\x00" for c in range(NCP))


def _from_regex(table: bytearray) -> bool:
    try:
        import regex
    except ImportError:
        return False
    text = _all_chars()
    newer = [v for v in ("16.1", "17.0", "17.1", "18.0") if v > UNICODE_VERSION]
    too_new = bytearray(NCP)
    for v in newer:
        try:
            pat = regex.compile(r"\p{Age=%s}+" % v)
        except regex.error:
            continue
        for m in pat.finditer(text):
            too_new[m.start():m.end()] = b"\x01" * (m.end() - m.start())
    for flag, pat in ((LETTER, r"\p{L}+"), (NUMBER, r"\p{N}+")):
        for m in regex.finditer(pat, text):
            for c in range(m.start(), m.end()):
                if not too_new[c]:
                    table[c] |= flag
    return True


def _from_unicodedata(table: bytearray) -> None:
    cat = unicodedata.category
    for c in range(NCP):
        k = cat(chr(c))[0]
        if k == "L":
            table[c] = LETTER
        elif k == "N":
            table[c] = NUMBER


def char_classes() -> bytes:
    """The class table: one byte per code point (bits LETTER, NUMBER, SPACE)."""
    global _table
    if _table is None:
        table = bytearray(NCP)
        if not _from_regex(table):
            _from_unicodedata(table)
        for c in range(0xD800, 0xE000):
            table[c] = 0
        for c in _WHITE_SPACE:
            table[c] |= SPACE
        _table = bytes(table)
    return _table
