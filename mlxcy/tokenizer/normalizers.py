"""Normalizers from tokenizer.json, as plain str -> str functions."""
from __future__ import annotations

import unicodedata

from .errors import TokenizerError


def _pattern(spec: dict, what: str):
    """A Replace/Split pattern: {"String": s} (literal) or {"Regex": r}."""
    pat = spec.get("pattern")
    if not isinstance(pat, dict) or len(pat) != 1:
        raise TokenizerError(f"{what}: malformed pattern {pat!r}")
    (kind, value), = pat.items()
    if not isinstance(value, str):
        raise TokenizerError(f"{what}: pattern.{kind} must be a string, not "
                             f"{type(value).__name__}")
    if kind == "String":
        return value, None
    if kind == "Regex":
        import regex  # Oniguruma-like syntax (\p{L}); only for unusual files
        try:
            return None, regex.compile(value)
        except (regex.error, ValueError, OverflowError, RecursionError) as e:
            raise TokenizerError(f"{what}: pattern.Regex {value!r:.80} is not a valid regex "
                                 f"({e})") from None
    raise TokenizerError(f"{what}: unsupported pattern kind {kind!r}")


def str_field(spec: dict, key: str, default, what: str) -> str:
    """spec[key] (default when absent), which must be a string."""
    v = spec.get(key, default)
    if not isinstance(v, str):
        raise TokenizerError(f"{what}: field {key!r} must be a string, not {type(v).__name__}")
    return v


def build_normalizer(spec: dict | None):
    """Return a function str -> str (or None for no normalizer)."""
    if spec is None:
        return None
    if not isinstance(spec, dict):
        raise TokenizerError(f"normalizer must be a JSON object, not {type(spec).__name__}")
    kind = spec.get("type")
    if kind == "Sequence":
        if not isinstance(spec.get("normalizers", []), list):
            raise TokenizerError("normalizer.normalizers must be a list")
        steps = [f for f in (build_normalizer(s) for s in spec.get("normalizers", [])) if f]
        if not steps:
            return None

        def seq(text: str) -> str:
            for f in steps:
                text = f(text)
            return text
        return seq
    if kind in ("NFC", "NFKC", "NFD", "NFKD"):
        form = kind
        # is_normalized is a fast check that avoids copying already-normal text
        return lambda t: t if unicodedata.is_normalized(form, t) else unicodedata.normalize(form, t)
    if kind == "Lowercase":
        return str.lower
    if kind == "Prepend":
        pre = str_field(spec, "prepend", None, "Prepend normalizer")
        return lambda t: pre + t if t else t
    if kind == "Replace":
        lit, rx = _pattern(spec, "Replace normalizer")
        content = str_field(spec, "content", "", "Replace normalizer")
        if rx is None:
            return lambda t: t.replace(lit, content)
        return lambda t: rx.sub(content.replace("\\", "\\\\"), t)
    raise TokenizerError(f"unsupported normalizer type {kind!r} in tokenizer.json")
