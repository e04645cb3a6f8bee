"""From a sequence's token ids to the text a caller sees: incremental
detokenization, and stop strings that are never emitted, not even in part."""
from __future__ import annotations

__all__ = ["StopMatcher", "TextStream"]


class StopMatcher:
    """Holds back text that could be the start of a stop string, so no part
    of a stop string is ever emitted."""

    def __init__(self, stops):
        self.stops = [s for s in stops if s]
        self.buf = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """Returns (text safe to emit, stopped)."""
        if not self.stops:
            return text, False
        self.buf += text
        cut = min((i for i in (self.buf.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            out, self.buf = self.buf[:cut], ""
            return out, True
        keep = 0
        for s in self.stops:   # longest suffix of buf that is a prefix of a stop
            for k in range(min(len(s) - 1, len(self.buf)), 0, -1):
                if self.buf.endswith(s[:k]):
                    keep = max(keep, k)
                    break
        out = self.buf[:len(self.buf) - keep]
        self.buf = self.buf[len(self.buf) - keep:]
        return out, False

    def flush(self) -> str:
        out, self.buf = self.buf, ""
        return out


class TextStream:
    """Token ids in, text out: `push(id) -> (text, stopped)`, then `finish()`
    for the text held back when the sequence ends without a stop string."""

    def __init__(self, tokenizer, stops=()):
        from mlxcy.tokenizer import StreamDecoder
        self.decoder = StreamDecoder(tokenizer, skip_special_tokens=True)
        self.matcher = StopMatcher(stops)
        self.stopped = False

    def push(self, token: int) -> tuple[str, bool]:
        text, hit = self.matcher.feed(self.decoder.push(token))
        self.stopped = self.stopped or hit
        return text, hit

    def finish(self) -> str:
        if self.stopped:
            return ""
        tail, _ = self.matcher.feed(self.decoder.finish())
        return tail + self.matcher.flush()
