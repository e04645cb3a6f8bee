"""Constrained decoding: a per-step token mask from a JSON schema's grammar.

The grammar engine is llguidance (PyPI `llguidance`, an Earley parser over
the tokenizer's vocabulary in Rust).  Its tokenizer view is built once per
server from the bytes of every token id (mlxcy.serve.vocab) and cached; each
constrained request gets a matcher, and the engine calls its TokenMask with the
ids generated so far before sampling each token.

The JSON is generated compactly (no free whitespace between tokens), so a model
cannot pad the output with blank space until max_tokens runs out.
"""
from __future__ import annotations

import threading

import numpy as np

from .errors import bad_request

__all__ = ["Grammars", "TokenMask", "tool_call_schema"]


class TokenMask:
    """callable(generated_ids) -> numpy bool [vocab]: the tokens the grammar
    allows next.  Once the grammar is complete only the stop ids are allowed."""

    def __init__(self, matcher, grammar_vocab: int, vocab_size: int, stop_ids):
        self.matcher = matcher
        self.vocab_size = vocab_size
        self.stop_ids = sorted(stop_ids)
        self.consumed = 0
        n_words = (grammar_vocab + 31) // 32
        self._bits = np.full(n_words, -1, dtype=np.int32)
        self.error = None

    def __call__(self, generated) -> np.ndarray:
        m = self.matcher
        for t in generated[self.consumed:]:
            if not m.consume_token(int(t)):
                self.error = m.get_error() or f"token {t} rejected by the grammar"
            self.consumed += 1
        out = np.zeros(self.vocab_size, dtype=bool)
        if m.is_stopped() or m.is_error():
            out[self.stop_ids] = True
            return out
        m.unsafe_compute_mask_ptr(self._bits.ctypes.data, self._bits.nbytes)
        bits = np.unpackbits(self._bits.view(np.uint8), bitorder="little")
        n = min(self.vocab_size, bits.shape[0])
        out[:n] = bits[:n].astype(bool)
        if m.is_accepting():
            out[self.stop_ids] = True
        if not out.any():          # cannot happen with a consistent grammar; never stall
            out[self.stop_ids] = True
        return out


class Grammars:
    """Compiles JSON schemas into TokenMasks for one tokenizer/model pair.
    The llguidance tokenizer (a few seconds for a 150k vocabulary) is made on
    first use and kept."""

    def __init__(self, tokenizer, model_vocab_size: int, stop_ids):
        self.tokenizer = tokenizer
        self.vocab_size = model_vocab_size
        self.stop_ids = sorted(stop_ids)
        self._lltok = None
        self._lock = threading.Lock()

    def lltokenizer(self):
        with self._lock:
            if self._lltok is None:
                import llguidance
                from .vocab import token_bytes
                tok = self.tokenizer
                toks = token_bytes(tok)
                toks += [b""] * max(0, self.vocab_size - len(toks))

                class _Wrapped:
                    eos_token_id = self.stop_ids[0] if self.stop_ids else tok.eos_id
                    bos_token_id = tok.bos_id
                    tokens = toks
                    special_token_ids = sorted(tok.special_ids)

                    def __call__(self, s):
                        if isinstance(s, bytes):
                            s = s.decode("utf-8", "replace")
                        return tok.encode(s, add_special_tokens=False)

                self._lltok = llguidance.LLTokenizer(
                    llguidance.TokenizerWrapper(_Wrapped()), n_vocab=len(toks),
                    eos_token=self.stop_ids or None)
            return self._lltok

    def compile_json(self, schema: dict, param: str) -> "MatcherFactory":
        """Check `schema` now (a 400 naming `param` if llguidance refuses it);
        returns a factory making one TokenMask per sequence."""
        import llguidance
        lltok = self.lltokenizer()
        schema = dict(schema)
        xg = dict(schema.get("x-guidance") or {})
        xg.setdefault("whitespace_flexible", False)
        schema["x-guidance"] = xg
        try:
            grammar = llguidance.LLMatcher.grammar_from_json_schema(schema)
        except (ValueError, TypeError) as e:
            raise bad_request(param, f"invalid JSON schema: {e}") from None
        ok, msg = _validate(llguidance, grammar, lltok)
        if not ok:
            raise bad_request(param, f"unsupported JSON schema: {msg}")
        return MatcherFactory(llguidance, lltok, grammar, self.vocab_size, self.stop_ids)


def _validate(llguidance, grammar, lltok):
    try:
        is_err, msgs = llguidance.LLMatcher.validate_grammar_with_warnings(grammar, lltok)
        if is_err:
            return False, "; ".join(msgs)
        return True, ""
    except AttributeError:   # older llguidance
        err = llguidance.LLMatcher.validate_grammar(grammar, lltok)
        return (not err), err


class MatcherFactory:
    def __init__(self, llguidance, lltok, grammar, vocab_size, stop_ids):
        self._ll, self._tok, self._grammar = llguidance, lltok, grammar
        self._vocab, self._stops = vocab_size, stop_ids

    def __call__(self) -> TokenMask:
        m = self._ll.LLMatcher(self._tok, self._grammar)
        return TokenMask(m, self._tok.vocab_size, self._vocab, self._stops)


def tool_call_schema(tools, args_key: str = "arguments") -> dict:
    """The JSON schema of one call to any of `tools`: {"name": const,
    args_key: the tool's parameters}."""
    alts = []
    for t in tools:
        fn = t["function"]
        alts.append({"type": "object",
                     "properties": {"name": {"const": fn["name"]},
                                    args_key: fn.get("parameters") or {"type": "object"}},
                     "required": ["name", args_key], "additionalProperties": False})
    return alts[0] if len(alts) == 1 else {"anyOf": alts}
