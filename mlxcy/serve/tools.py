"""Tool calls in model output, for the two families whose chat templates
render tools:

- Qwen 2.5 / 3 (Hermes style): `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`,
  any number of them, possibly after some text.
- Llama 3.1 / 3.2 / 3.3 (JSON style): the whole reply is `{"name": ...,
  "parameters": {...}}` (optionally after `<|python_tag|>`), several joined
  by ";".

`style_for(template_source, model_type)` picks the style; `parse_tool_calls`
splits a finished reply into content and OpenAI `tool_calls`; ToolStream holds
back streamed text that may be a tool call, so no part of one is sent as content.
"""
from __future__ import annotations

import json
import re
import uuid

__all__ = ["QWEN", "LLAMA", "style_for", "parse_tool_calls", "ToolStream", "forced_prefix",
           "args_key"]

QWEN = "qwen"
LLAMA = "llama"

_QWEN_OPEN, _QWEN_CLOSE = "<tool_call>", "</tool_call>"
_LLAMA_TAG = "<|python_tag|>"
_QWEN_RE = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.S)


def style_for(template_source: str | None, model_type: str | None) -> str | None:
    """QWEN, LLAMA, or None when the template shows no tool-call format."""
    src = template_source or ""
    if _QWEN_OPEN in src:
        return QWEN
    if "<|python_tag|>" in src or ("tools" in src and '"parameters"' in src) \
            or "<|eom_id|>" in src:
        return LLAMA
    if model_type in ("qwen2", "qwen3"):
        return QWEN
    if model_type == "llama" and "tools" in src:
        return LLAMA
    return None


def args_key(style: str) -> str:
    return "parameters" if style == LLAMA else "arguments"


def forced_prefix(style: str) -> str:
    """Text appended to the prompt when a tool call is forced (tool_choice
    "required" or a named function): the reply then is the call's JSON."""
    return _QWEN_OPEN + "\n" if style == QWEN else ""


def _call(name, args) -> dict:
    if not isinstance(args, str):
        args = json.dumps(args, ensure_ascii=False)
    return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
            "function": {"name": name, "arguments": args}}


def _obj_call(obj, style):
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    if args is None:
        args = {}
    return _call(obj["name"], args)


def parse_tool_calls(text: str, style: str | None, tool_names=None):
    """(content or None, [tool_call, ...]).  Text that does not hold a
    well-formed call of a known tool stays content."""
    if not style or not text:
        return text, []
    names = set(tool_names) if tool_names else None
    if style == QWEN:
        calls = []
        for m in _QWEN_RE.finditer(text):
            try:
                c = _obj_call(json.loads(m.group(1)), style)
            except (ValueError, RecursionError):   # (RecursionError: nested too deep)
                c = None
            if c is None or (names is not None and c["function"]["name"] not in names):
                return text, []
            calls.append(c)
        if not calls:
            return text, []
        content = text[:text.find(_QWEN_OPEN)].strip()
        return (content or None), calls
    body = text.strip()
    if body.startswith(_LLAMA_TAG):
        body = body[len(_LLAMA_TAG):].strip()
    if not body.startswith("{"):
        return text, []
    calls = []
    for part in _split_json_objects(body):
        try:
            c = _obj_call(json.loads(part), style)
        except (ValueError, RecursionError):
            return text, []
        if c is None or (names is not None and c["function"]["name"] not in names):
            return text, []
        calls.append(c)
    return (None, calls) if calls else (text, [])


def _split_json_objects(s: str):
    """Top-level JSON objects in `s`, separated by ';' or whitespace."""
    out, depth, start, in_str, esc = [], 0, None, False, False
    for i, ch in enumerate(s):
        if in_str:
            if esc:
                esc = False
            elif ch == "\\":
                esc = True
            elif ch == '"':
                in_str = False
            continue
        if ch == '"':
            in_str = True
        elif ch == "{":
            if depth == 0:
                start = i
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0 and start is not None:
                out.append(s[start:i + 1])
                start = None
        elif depth == 0 and ch not in " \t\r\n;":
            out.append(s[i:])        # trailing text: json.loads will refuse it
            break
    if depth != 0 and start is not None:
        out.append(s[start:])
    return out


class ToolStream:
    """Streams content while holding back anything that may be a tool call.

    feed(text) -> text safe to send as content now; finish() -> (content
    left, tool_calls).  With the Qwen style, text before `<tool_call>` streams
    and the rest is held; with the Llama style a reply that starts with `{` or
    the python tag is held whole."""

    def __init__(self, style: str | None, tool_names=None, forced: bool = False):
        self.style = style
        self.names = tool_names
        self.all_text = []
        self.sent = 0            # characters of the joined text sent as content
        self.holding = forced    # a forced call: nothing is content
        self.forced = forced

    def feed(self, text: str) -> str:
        self.all_text.append(text)
        if self.style is None:
            self.sent += len(text)
            return text
        if self.holding:
            return ""
        full = "".join(self.all_text)
        pending = full[self.sent:]
        if self.style == QWEN:
            k = pending.find(_QWEN_OPEN)
            if k >= 0:
                self.holding = True
                out = pending[:k]
            else:
                out = pending[:len(pending) - _partial_suffix(pending, _QWEN_OPEN)]
        else:
            stripped = full.lstrip()
            if not stripped:
                return ""
            if stripped[0] == "{" or _LLAMA_TAG.startswith(stripped[:len(_LLAMA_TAG)]):
                self.holding = True
                return ""
            out = pending
        self.sent += len(out)
        return out

    def finish(self):
        """(content not yet sent, tool_calls)."""
        full = "".join(self.all_text)
        if self.style is None:
            return "", []
        text = (forced_prefix(self.style) + full) if self.forced else full
        _, calls = parse_tool_calls(text, self.style, self.names)
        if calls:
            rest = ""
            if self.style == QWEN and not self.forced:
                k = full.find(_QWEN_OPEN)
                rest = full[self.sent:k] if k > self.sent else ""
            return rest, calls
        return full[self.sent:], []


def _partial_suffix(s: str, marker: str) -> int:
    """Length of the longest suffix of s that is a proper prefix of marker."""
    for k in range(min(len(marker) - 1, len(s)), 0, -1):
        if s.endswith(marker[:k]):
            return k
    return 0
