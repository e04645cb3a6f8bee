"""Incremental detokenization: one id in, only complete text out."""
from __future__ import annotations


class StreamDecoder:
    """Push ids one at a time; `push` returns the text they complete.

    It decodes a short window (the last emitted token as context, then the
    new ones) and emits what the window adds beyond the context's own text,
    only once that does not end in U+FFFD (a UTF-8 character still being
    spelled out in bytes). The context token keeps SentencePiece's leading
    space handling right. With a ByteFallback decoder a run of <0xXX> tokens
    is decoded as one group (all of it becomes U+FFFD if any of it is bad),
    so nothing is emitted while the run is open. `finish()` returns whatever
    is left, so the pieces always join to `decode` of the whole sequence.
    """

    def __init__(self, tokenizer, skip_special_tokens: bool = False):
        self.tok, self.skip = tokenizer, skip_special_tokens
        self.ids: list[int] = []
        self.start = 0            # window start in self.ids
        self.window_text = ""     # decode(ids[start:]) already accounted for
        self.emitted_len = 0      # characters emitted in total
        self.byte_tokens = _byte_fallback_ids(tokenizer)

    def _decode(self, ids) -> str:
        return self.tok.decode(ids, self.skip)

    def push(self, token_id: int) -> str:
        self.tok.decode([token_id])          # range check, clear error
        self.ids.append(token_id)
        if token_id in self.byte_tokens:
            return ""
        text = self._decode(self.ids[self.start:])
        if text.endswith("\ufffd") or len(text) <= len(self.window_text):
            return ""
        if text.startswith(self.window_text):
            new = text[len(self.window_text):]
        else:   # the window is not prefix-stable here: fall back to the whole
            full = self._decode(self.ids)
            new = full[self.emitted_len:]
        self.emitted_len += len(new)
        self.start = len(self.ids) - 1
        self.window_text = self._decode(self.ids[self.start:])
        return new

    def finish(self) -> str:
        """Text not yet emitted (e.g. a trailing incomplete byte sequence)."""
        rest = self._decode(self.ids)[self.emitted_len:]
        self.emitted_len += len(rest)
        return rest


def _byte_fallback_ids(tok) -> frozenset:
    """Ids of <0xXX> tokens when the decoder has a ByteFallback step."""
    import json
    import re
    if '"ByteFallback"' not in json.dumps(tok._decoder_spec):
        return frozenset()
    pat = re.compile(r"<0x[0-9A-Fa-f]{2}>")
    return frozenset(i for i in range(tok.vocab_size)
                     if (t := tok.id_to_token(i)) is not None and len(t) == 6 and pat.fullmatch(t))
