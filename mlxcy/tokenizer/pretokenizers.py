"""Pre-tokenizer configuration: which parts run natively in `_bpe`, which in Python.

The regexes of the supported model families (Llama 3, Qwen 2/3, GPT-2, and
SmolLM/StarCoder's Digits + GPT-2) are recognised and run by the native
scanner. Other Split patterns, Metaspace and string splits run in Python
first, then the native part handles each resulting piece.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from .errors import TokenizerError
from .normalizers import _pattern

# The regex of Llama 3 (max_digits 3) and Qwen 2/3 (max_digits 1).
_LLAMA3_TEMPLATE = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}%s"
                    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
KNOWN_SPLITS = {_LLAMA3_TEMPLATE % "{1,3}": 3, _LLAMA3_TEMPLATE % "": 1}
GPT2_REGEX = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"

MODE_NONE, MODE_LLAMA3, MODE_GPT2 = 0, 1, 2


@dataclass
class PreTokenizerPlan:
    """What `_bpe.BPECore.set_pretokenizer` gets, plus the Python steps before it."""
    mode: int = MODE_NONE
    max_digits: int = 0
    digits_individual: bool = False
    byte_level: bool = False          # a ByteLevel step was present
    prefix_space: bool = False        # ByteLevel(add_prefix_space=True)
    python_steps: list = field(default_factory=list)   # f(pieces: list[(str, bool first)]) -> list

    @property
    def native_started(self) -> bool:
        return self.mode != MODE_NONE or self.digits_individual or self.byte_level


def _split_spans(text: str, spans, behavior: str, invert: bool) -> list[str]:
    """Apply a Split behaviour given the matched (start, end) spans."""
    pieces, pos = [], 0
    marks = []  # (start, end, is_match)
    for a, b in spans:
        if a > pos:
            marks.append((pos, a, False))
        marks.append((a, b, True))
        pos = b
    if pos < len(text):
        marks.append((pos, len(text), False))
    if invert:
        marks = [(a, b, not m) for a, b, m in marks]
    if behavior == "Removed":
        return [text[a:b] for a, b, m in marks if not m]
    if behavior == "Isolated":
        return [text[a:b] for a, b, m in marks]
    if behavior == "MergedWithPrevious":
        for a, b, m in marks:
            if m and pieces:
                pieces[-1] += text[a:b]
            else:
                pieces.append(text[a:b])
        return pieces
    if behavior == "MergedWithNext":
        pending = ""
        for a, b, m in marks:
            if m:
                pending += text[a:b]
            else:
                pieces.append(pending + text[a:b])
                pending = ""
        if pending:
            pieces.append(pending)
        return pieces
    if behavior == "Contiguous":
        for a, b, m in marks:
            if m and pieces and pieces[-1][1]:
                pieces[-1] = (pieces[-1][0] + text[a:b], True)
            else:
                pieces.append((text[a:b], m))
        return [p for p, _ in pieces]
    raise TokenizerError(f"Split pre-tokenizer: unsupported behavior {behavior!r}")


def _split_step(spec: dict):
    lit, rx = _pattern(spec, "Split pre-tokenizer")
    behavior, invert = spec.get("behavior", "Isolated"), bool(spec.get("invert", False))

    def spans(text):
        if rx is not None:
            return [m.span() for m in rx.finditer(text) if m.end() > m.start()]
        out, i = [], text.find(lit) if lit else -1
        while i >= 0:
            out.append((i, i + len(lit)))
            i = text.find(lit, i + len(lit))
        return out

    def step(pieces):
        res = []
        for text, first in pieces:
            if rx is None and lit not in text:   # common: Gemma's " " after ▁ replacement
                res.append((text, first))
                continue
            for k, p in enumerate(_split_spans(text, spans(text), behavior, invert)):
                if p:
                    res.append((p, first and k == 0))
        return res
    return step


def _metaspace_step(spec: dict):
    from .normalizers import str_field
    rep = str_field(spec, "replacement", "\u2581", "Metaspace pre-tokenizer")
    if not rep:
        raise TokenizerError("Metaspace pre-tokenizer: field 'replacement' is empty")
    scheme = spec.get("prepend_scheme")
    if scheme is None:  # older files: add_prefix_space
        scheme = "always" if spec.get("add_prefix_space", True) else "never"
    if scheme not in ("always", "first", "never"):
        raise TokenizerError(f"Metaspace: unsupported prepend_scheme {scheme!r}")
    split = spec.get("split", True)

    def step(pieces):
        res = []
        for text, first in pieces:
            t = text.replace(" ", rep)
            if (scheme == "always" or (scheme == "first" and first)) and not t.startswith(rep):
                t = rep + t
            if split:
                spans = [(i, i + 1) for i, ch in enumerate(t) if ch == rep]
                parts = _split_spans(t, spans, "MergedWithNext", False)
            else:
                parts = [t]
            res.extend((p, first and k == 0) for k, p in enumerate(parts) if p)
        return res
    return step


def plan(spec: dict | None) -> PreTokenizerPlan:
    """Translate a tokenizer.json pre_tokenizer into a PreTokenizerPlan."""
    p = PreTokenizerPlan()
    if spec is not None and not isinstance(spec, dict):
        raise TokenizerError(f"pre_tokenizer must be a JSON object or null, not "
                             f"{type(spec).__name__}")
    steps = spec.get("pretokenizers", []) if spec and spec.get("type") == "Sequence" else (
        [spec] if spec else [])
    if not isinstance(steps, list):
        raise TokenizerError("pre_tokenizer.pretokenizers must be a list")
    for s in steps:
        _add_step(p, s)
    return p


def _add_step(p: PreTokenizerPlan, s: dict) -> None:
    kind = s.get("type") if isinstance(s, dict) else None
    if kind == "Sequence":
        for sub in s.get("pretokenizers", []):
            _add_step(p, sub)
        return
    native_pattern = None
    if kind == "Split":
        pat = s.get("pattern", {})
        native_pattern = pat.get("Regex") if isinstance(pat, dict) else None
    if (kind == "Split" and native_pattern in KNOWN_SPLITS and s.get("behavior") == "Isolated"
            and not s.get("invert") and p.mode == MODE_NONE and not p.byte_level):
        p.mode, p.max_digits = MODE_LLAMA3, KNOWN_SPLITS[native_pattern]
    elif kind == "ByteLevel":
        if p.byte_level:
            raise TokenizerError("two ByteLevel pre-tokenizers in one sequence are not supported")
        p.byte_level = True
        p.prefix_space = bool(s.get("add_prefix_space", False))
        if p.prefix_space and (p.mode != MODE_NONE or p.digits_individual or p.python_steps):
            raise TokenizerError("ByteLevel(add_prefix_space=True) after another pre-tokenizer "
                                 "is not supported")
        if s.get("use_regex", True):
            if p.mode != MODE_NONE:
                raise TokenizerError("ByteLevel(use_regex=True) after a Split regex is not supported")
            p.mode = MODE_GPT2
    elif kind == "Digits" and s.get("individual_digits") and not p.native_started:
        p.digits_individual = True
    elif kind in ("Split", "Metaspace") and not p.native_started:
        p.python_steps.append(_split_step(s) if kind == "Split" else _metaspace_step(s))
    elif kind in ("Split", "Metaspace", "Digits"):
        raise TokenizerError(f"pre-tokenizer {kind} in this position (after a native step) "
                             "is not supported")
    else:
        raise TokenizerError(f"unsupported pre-tokenizer type {kind!r} in tokenizer.json")
