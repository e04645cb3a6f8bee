"""Added tokens: found whole in the text before the model sees it.

Like `tokenizers`, the longest token wins at the leftmost position; the
tokens are compiled into one trie-shaped regex so thousands of them (Gemma
has 6,000+) cost about one character-class test per text position.
"""
from __future__ import annotations

import re

from .unicode_classes import _WHITE_SPACE

_WS = frozenset(map(chr, _WHITE_SPACE))


def _trie_regex(words: list[str]) -> str:
    """A regex matching exactly `words`, longest first at each position."""
    trie: dict = {}
    for w in words:
        node = trie
        for ch in w:
            node = node.setdefault(ch, {})
        node[""] = True

    def emit(node) -> str:
        end = node.get("") is True
        alts = [re.escape(ch) + emit(child) for ch, child in node.items() if ch != ""]
        if not alts:
            return ""
        body = alts[0] if len(alts) == 1 else "(?:" + "|".join(alts) + ")"
        if end:
            return "(?:" + body + ")?"
        return body if len(alts) == 1 else body
    return emit(trie)


def _is_word_char(ch: str) -> bool:
    return ch.isalnum() or ch == "_"


class AddedTokens:
    """Matcher for one set of added tokens (normalized or not)."""

    def __init__(self, tokens: list[dict]):
        self.by_content = {t["content"]: t for t in tokens if t["content"]}
        self.regex = (re.compile(_trie_regex(sorted(self.by_content)))
                      if self.by_content else None)

    def split(self, text: str):
        """Yield (piece, None) for plain text and (None, token dict) for tokens."""
        if self.regex is None:
            yield text, None
            return
        start = 0
        for m in self.regex.finditer(text):
            a, b = m.span()
            if a < start:   # consumed by a previous token's rstrip
                continue
            tok = self.by_content[m.group()]
            if tok.get("single_word") and (
                    (a > 0 and _is_word_char(text[a - 1])) or
                    (b < len(text) and _is_word_char(text[b]))):
                continue
            if tok.get("lstrip"):
                while a > start and text[a - 1] in _WS:
                    a -= 1
            if tok.get("rstrip"):
                while b < len(text) and text[b] in _WS:
                    b += 1
            if start < a:
                yield text[start:a], None
            yield None, tok
            start = b
        if start < len(text):
            yield text[start:], None
