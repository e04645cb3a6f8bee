"""Chat templates: render a model's own Jinja template as transformers does.

    tmpl = ChatTemplate.from_tokenizer_config("path/to/model_dir")
    prompt = tmpl.render([{"role": "user", "content": "Hi"}],
                         add_generation_prompt=True, enable_thinking=False)

The environment matches transformers' `apply_chat_template` (5.x): a sandboxed
Jinja2 environment (ImmutableSandboxedEnvironment, trim_blocks,
lstrip_blocks, the loopcontrols extension and a `{% generation %}` block
tag), the globals `raise_exception`, `strftime_now`, `dict` and `namespace`,
and a `tojson` filter that does not HTML-escape and accepts `indent`,
`separators`, `sort_keys` and `ensure_ascii`.  The template sees `messages`,
`add_generation_prompt`, `tools`, `documents`, the tokenizer's named special
tokens (bos_token, eos_token, unk_token, sep_token, pad_token, cls_token,
mask_token) and any extra keyword (e.g. Qwen3's `enable_thinking`).

Inputs are normalised the same way: message keys whose value is None are
dropped, values are reduced to plain JSON types, and a message's reasoning
given as `reasoning_content`, `thinking` or `reasoning` is exposed under both
`reasoning_content` and `thinking`.

`builtin(family)` gives templates for checkpoints that ship none: "gemma3",
"chatml" (alias "qwen"), "llama3" and "llama3.2".
"""
from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

__all__ = ["ChatTemplate", "ChatTemplateError", "builtin", "model_template", "BUILTIN_FAMILIES",
           "SPECIAL_TOKEN_NAMES"]

# The named special tokens transformers passes to every template.
SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token",
                       "cls_token", "mask_token")

_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")
_CONTINUE_TAG = "CONTINUE_FINAL_MESSAGE_TAG "


from mlxcy.errors import ChatTemplateError  # noqa: E402,F401  (re-exported)
from mlxcy.json_files import read_json_object  # noqa: E402


# ----------------------------------------------------------- environment ----

def _jinja():
    try:
        import jinja2
        import jinja2.ext
        import jinja2.sandbox
    except ImportError as e:  # pragma: no cover - jinja2 is a dependency
        raise ImportError("mlxcy.chat needs jinja2>=3.1.6: pip install 'jinja2>=3.1.6'") from e
    return jinja2


_MAX_POW_BITS = 1 << 16         # an int result of at most 64 kbit
_MAX_REPEAT = 1 << 24           # 16 M items from `seq * n`


@lru_cache(maxsize=64)
def _compile(source: str):
    jinja2 = _jinja()
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationTag(jinja2.ext.Extension):
        # `{% generation %}...{% endgeneration %}` marks assistant text for
        # transformers' assistant masks; rendering just emits the body.
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body) \
                .set_lineno(lineno)

        def _body(self, caller):
            return caller()

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent,
                          separators=separators, sort_keys=sort_keys)

    def strftime_now(format):
        return datetime.now().strftime(format)

    class TemplateDict:
        # dict(...) and dict.fromkeys(...) without exposing the type itself
        def __call__(self, *args, **kwargs):
            return dict(*args, **kwargs)

        def fromkeys(self, *args, **kwargs):
            return dict.fromkeys(*args, **kwargs)

    class TemplateNamespace(jinja2.utils.Namespace):
        # namespaces refuse underscore-prefixed attributes
        def __init__(*args, **kwargs):
            self, args = args[0], args[1:]
            attrs = dict(*args, **kwargs)
            for name in attrs:
                TemplateNamespace._check_name(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name, value):
            TemplateNamespace._check_name(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def _check_name(name):
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(
                    f"chat templates cannot store underscore-prefixed attributes on a "
                    f"namespace, but got {name!r}")

    class BoundedEnvironment(ImmutableSandboxedEnvironment):
        # The sandbox bounds range() but not `9**9**9` (minutes of CPU) or
        # `'a' * 10**12` (a MemoryError after swapping): refuse results that
        # large before computing them.
        intercepted_binops = frozenset(["**", "*"])

        def call_binop(self, context, operator, left, right):
            if operator == "**" and isinstance(left, int) and isinstance(right, int) \
                    and abs(left) > 1 and right > 0 \
                    and right * max(abs(left).bit_length(), 1) > _MAX_POW_BITS:
                raise jinja2.exceptions.SecurityError(
                    f"{left} ** {right} is too large for a chat template")
            if operator == "*" and isinstance(right, int) and isinstance(left, (str, list, tuple)) \
                    or operator == "*" and isinstance(left, int) and isinstance(right, (str, list, tuple)):
                n, seq = (right, left) if isinstance(right, int) else (left, right)
                if n * len(seq) > _MAX_REPEAT:
                    raise jinja2.exceptions.SecurityError(
                        f"repeating a sequence of {len(seq)} {n} times is too large for a "
                        f"chat template")
            return super().call_binop(context, operator, left, right)

    env = BoundedEnvironment(trim_blocks=True, lstrip_blocks=True,
                             extensions=[GenerationTag, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    env.globals["dict"] = TemplateDict()
    env.globals["namespace"] = TemplateNamespace
    try:
        return env.from_string(source)
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise ChatTemplateError(f"chat template syntax error at line {e.lineno}: "
                                f"{e.message}") from e
    except RecursionError:
        raise ChatTemplateError("chat template is nested too deeply to compile") from None
    except (jinja2.exceptions.TemplateError, TypeError, ValueError, AttributeError,
            KeyError, IndexError, ArithmeticError, SyntaxError) as e:
        # (SyntaxError: jinja compiles `{% break %}` outside a loop to invalid Python)
        raise ChatTemplateError(f"chat template failed to compile: {type(e).__name__}: "
                                f"{e}") from e


# ---------------------------------------------------------- input shaping ----

def _plain(value: Any) -> Any:
    """Rebuild a value out of plain JSON types (what the sandbox may see)."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, bool):
        return bool(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_plain(v) for v in value)
    item = getattr(value, "item", None)
    if type(value).__module__ == "numpy" and callable(item):   # numpy scalars
        return _plain(item())
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if callable(getattr(value, "model_dump", None)):            # pydantic models
        return _plain(value.model_dump())
    return f"<{type(value).__name__}>"


def _alias_reasoning(chat: list) -> list:
    out = []
    for m in chat:
        reasoning = next((m[k] for k in _REASONING_FIELDS if m.get(k) is not None), None)
        if reasoning is not None:
            m = {"thinking": reasoning, **m, "reasoning_content": reasoning}
        out.append(m)
    return out


def _token_str(v: Any) -> str | None:
    """A special token as stored in tokenizer_config.json: a string or a
    serialized AddedToken {"content": ...}."""
    if v is None:
        return None
    if isinstance(v, str):
        return v
    if isinstance(v, Mapping) and isinstance(v.get("content"), str):
        return v["content"]
    return str(v)


# --------------------------------------------------------------- template ----

class ChatTemplate:
    """A compiled chat template plus the special tokens it is rendered with.

    ChatTemplate(template, bos_token=None, eos_token=None, **special)

    `template`: the Jinja source; or several named templates, as a list of
    {"name": ..., "template": ...} (tokenizer_config.json's form) or a dict
    name -> source, from which "default" is used (and "tool_use" when tools
    are given, as transformers does).  `special`: other special tokens
    (unk_token, pad_token, ...) or any variable every render should see.
    """

    def __init__(self, template, bos_token=None, eos_token=None, **special):
        self.templates = self._named(template)
        for name, src in self.templates.items():
            _compile(src)   # fail early on syntax errors
        self.special_tokens = {}
        for k, v in dict(special, bos_token=bos_token, eos_token=eos_token).items():
            v = _token_str(v)
            if v is not None:
                self.special_tokens[k] = v

    @staticmethod
    def _named(template) -> dict:
        if isinstance(template, str):
            return {"default": template}
        if isinstance(template, Mapping):
            items = list(template.items())
        elif isinstance(template, (list, tuple)):
            items = []
            for t in template:
                if not (isinstance(t, Mapping) and isinstance(t.get("name"), str)
                        and isinstance(t.get("template"), str)):
                    raise TypeError("template: a list of templates must hold "
                                    "{'name': str, 'template': str} dicts")
                items.append((t["name"], t["template"]))
        else:
            raise TypeError(f"template: expected a Jinja source string or named templates, "
                            f"got {type(template).__name__}")
        if not items:
            raise ValueError("template: no templates given")
        for name, src in items:
            if not isinstance(name, str) or not isinstance(src, str):
                raise TypeError("template: names and templates must be strings")
        return dict(items)

    @property
    def source(self) -> str:
        """The default template's source (the only one, for a single template)."""
        if "default" in self.templates:
            return self.templates["default"]
        return next(iter(self.templates.values()))

    def __repr__(self):
        names = list(self.templates)
        toks = ", ".join(f"{k}={v!r}" for k, v in self.special_tokens.items())
        return f"ChatTemplate(templates={names}, {toks})"

    def _pick(self, name, tools) -> str:
        if name is not None:
            if name not in self.templates:
                raise ValueError(f"template_name: {name!r} is not one of "
                                 f"{sorted(self.templates)}")
            return self.templates[name]
        if len(self.templates) == 1:
            return next(iter(self.templates.values()))
        if tools is not None and "tool_use" in self.templates:
            return self.templates["tool_use"]
        if "default" in self.templates:
            return self.templates["default"]
        raise ValueError(f"this model has several chat templates and none is named "
                         f"'default'; pass template_name= one of {sorted(self.templates)}")

    def render(self, messages, add_generation_prompt=True, tools=None, documents=None,
               continue_final_message=False, template_name=None, **kwargs) -> str:
        """The prompt text for `messages` (a list of {"role", "content", ...}).

        tools: JSON-schema dicts; documents: dicts; continue_final_message:
        end the prompt inside the last message (True for its "content", or the
        name of the field to continue); other keywords become template
        variables (and override special tokens of the same name)."""
        jinja2 = _jinja()
        if isinstance(messages, (str, bytes)) or not isinstance(messages, (list, tuple)):
            raise TypeError("messages: expected a list of message dicts, got "
                            f"{type(messages).__name__}")
        if len(messages) == 0:
            raise ValueError("messages: the conversation is empty")
        if continue_final_message and add_generation_prompt:
            raise ValueError("continue_final_message and add_generation_prompt cannot both "
                             "be set (pass add_generation_prompt=False)")
        chat = []
        for i, m in enumerate(messages):
            if hasattr(m, "model_dump") or (dataclasses.is_dataclass(m) and not isinstance(m, type)):
                m = _plain(m)
            if not isinstance(m, Mapping):
                raise TypeError(f"messages[{i}]: expected a dict, got {type(m).__name__}")
            chat.append({k: v for k, v in m.items() if v is not None})
        chat = _alias_reasoning(_plain(chat))
        if tools is not None:
            for t in tools:
                if not isinstance(t, Mapping):
                    raise TypeError("tools: each tool must be a JSON-schema dict, got "
                                    f"{type(t).__name__}")
        if documents is not None:
            for d in documents:
                if not isinstance(d, Mapping):
                    raise TypeError("documents: each document must be a dict")
        source = self._pick(template_name, tools)
        compiled = _compile(source)

        final = None
        if continue_final_message:
            field = continue_final_message if isinstance(continue_final_message, str) \
                else "content"
            final = chat[-1].get(field)
            if final is None:
                raise ValueError(f"continue_final_message: the last message has no "
                                 f"{field!r} to continue")
            fields = [field]
            if field in _REASONING_FIELDS:
                fields = [f for f in _REASONING_FIELDS if chat[-1].get(f) == final]
            if not any(f in source for f in fields):
                raise ValueError(f"continue_final_message: {field!r} is not a field this "
                                 f"chat template reads")
            if isinstance(final, (list, tuple)):
                for block in reversed(final):
                    if isinstance(block, Mapping) and "text" in block:
                        final = block["text"]
                        block["text"] = block["text"] + _CONTINUE_TAG
                        break
                else:
                    raise ValueError("continue_final_message: no text to continue in the "
                                     "last message")
            else:
                for f in fields:
                    chat[-1][f] = chat[-1][f] + _CONTINUE_TAG

        variables = _plain({**self.special_tokens, **kwargs})
        try:
            out = compiled.render(messages=chat, tools=_plain(tools),
                                  documents=_plain(documents),
                                  add_generation_prompt=add_generation_prompt, **variables)
        except jinja2.exceptions.TemplateError as e:
            raise ChatTemplateError(f"chat template error: {e.message or e}") from e
        except RecursionError:
            raise ChatTemplateError("chat template recursed too deeply while rendering "
                                    "(a macro or include calling itself?)") from None
        except MemoryError:
            raise ChatTemplateError("chat template ran out of memory while rendering") from None
        except (TypeError, KeyError, AttributeError, IndexError, ValueError,
                ArithmeticError, UnicodeError) as e:
            raise ChatTemplateError(f"chat template failed while rendering: "
                                    f"{type(e).__name__}: {e}") from e

        if continue_final_message:
            tag = _CONTINUE_TAG.strip()
            if final.strip() not in out or tag not in out:
                raise ValueError("continue_final_message: the chat template dropped part of "
                                 "the final message, so the prompt cannot end inside it")
            loc = out.rindex(tag)
            if out[loc:loc + len(_CONTINUE_TAG)] == _CONTINUE_TAG:
                out = out[:loc]
            else:
                out = out[:loc].rstrip()
        return out

    __call__ = render

    # -- loading ------------------------------------------------------------------

    @classmethod
    def from_tokenizer_config(cls, path_or_dict, fallback=None, **overrides) -> "ChatTemplate":
        """From a tokenizer_config.json (a dict, the file, or the model
        directory).  In a directory, `chat_template.jinja` (or
        chat_template.json) takes precedence over the config's chat_template,
        as in transformers.  `fallback`: a builtin() family whose template is
        used when the config has none (with the config's special tokens)."""
        template = None
        if isinstance(path_or_dict, Mapping):
            config = dict(path_or_dict)
        else:
            p = Path(os.fspath(path_or_dict))
            d = p if p.is_dir() else p.parent
            cfg_file = d / "tokenizer_config.json" if p.is_dir() else p
            if not cfg_file.exists():
                raise FileNotFoundError(f"path_or_dict: {cfg_file} does not exist")
            config = read_json_object(cfg_file, ChatTemplateError)
            if p.is_dir():
                jinja_file = d / "chat_template.jinja"
                json_file = d / "chat_template.json"
                templates_dir = d / "additional_chat_templates"
                if jinja_file.exists():
                    template = {"default": jinja_file.read_text(encoding="utf-8")}
                elif json_file.exists():
                    src = read_json_object(json_file, ChatTemplateError).get("chat_template")
                    if not isinstance(src, str):
                        raise ChatTemplateError(f"{json_file}: key 'chat_template' must be a "
                                                f"string, got {type(src).__name__}")
                    template = {"default": src}
                if template is not None and templates_dir.is_dir():
                    for t in sorted(templates_dir.glob("*.jinja")):
                        template[t.stem] = t.read_text(encoding="utf-8")
        if template is None:
            template = config.get("chat_template")
        if template is None and fallback is not None:
            template = builtin(fallback).templates
        if template is None:
            raise ValueError("path_or_dict: the tokenizer config has no chat_template; pass "
                             "fallback=<family> or use mlxcy.chat.builtin(family)")
        special = {k: _token_str(config.get(k)) for k in SPECIAL_TOKEN_NAMES}
        special.update(overrides)
        return cls(template, **special)

    @classmethod
    def from_gguf(cls, path, **overrides) -> "ChatTemplate":
        """From a GGUF file's `tokenizer.chat_template` metadata, with the
        special tokens its tokenizer.ggml.*_token_id keys name."""
        meta = read_gguf_metadata(path, wanted_prefix="tokenizer.")
        template = meta.get("tokenizer.chat_template")
        if template is None:
            raise ChatTemplateError(f"path: {path} has no tokenizer.chat_template; use "
                                    f"mlxcy.chat.builtin(family) for a standard one")
        if not isinstance(template, str):
            raise ChatTemplateError(f"{path}: metadata key 'tokenizer.chat_template' must be a "
                                    f"string, not {type(template).__name__}")
        tokens = meta.get("tokenizer.ggml.tokens") or []
        if not isinstance(tokens, list) or not all(isinstance(t, str) for t in tokens):
            tokens = []
        ids = {"bos_token": "bos", "eos_token": "eos", "unk_token": "unknown",
               "sep_token": "seperator", "pad_token": "padding", "cls_token": "cls",
               "mask_token": "mask"}
        special = {}
        for name, key in ids.items():
            i = meta.get(f"tokenizer.ggml.{key}_token_id")
            if type(i) is int and 0 <= i < len(tokens):
                special[name] = tokens[i]
        special.update(overrides)
        return cls(template, **special)


# ------------------------------------------------------------ GGUF reading ----

def read_gguf_metadata(path, wanted_prefix: str = "") -> dict:
    """The key/value metadata of a GGUF file whose keys start with
    `wanted_prefix`, read (and checked) by mlxcy.gguf_reader; the tokenizer's
    large merges/scores/token_type arrays are skipped.  Raises GGUFError."""
    from mlxcy.gguf_reader import read_metadata
    skip = ("tokenizer.ggml.merges", "tokenizer.ggml.scores", "tokenizer.ggml.token_type")
    meta = read_metadata(path, keep_arrays=lambda k: k.startswith(wanted_prefix) and k not in skip)
    return {k: v for k, v in meta.items() if k.startswith(wanted_prefix) and k not in skip}


# --------------------------------------------------------------- builtins ----

# Gemma 3 (Google's documented format): <bos>, turns `<start_of_turn>{user|model}\n
# ...<end_of_turn>\n`; a system message is folded into the first user turn,
# followed by a blank line; roles must alternate user/model.
_GEMMA3 = """{{ bos_token }}
{%- if messages[0]['role'] == 'system' -%}
    {%- if messages[0]['content'] is string -%}
        {%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}
    {%- else -%}
        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' -%}
    {%- endif -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set first_user_prefix = "" -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
        {{ raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}
    {%- endif -%}
    {%- if message['role'] == 'assistant' -%}
        {%- set role = "model" -%}
    {%- else -%}
        {%- set role = message['role'] -%}
    {%- endif -%}
    {{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else "") }}
    {%- if message['content'] is string -%}
        {{ message['content'] | trim }}
    {%- elif message['content'] is iterable -%}
        {%- for item in message['content'] -%}
            {%- if item['type'] == 'image' -%}
                {{ '<start_of_image>' }}
            {%- elif item['type'] == 'text' -%}
                {{ item['text'] | trim }}
            {%- endif -%}
        {%- endfor -%}
    {%- else -%}
        {{ raise_exception("Invalid content type") }}
    {%- endif -%}
    {{ '<end_of_turn>\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{ '<start_of_turn>model\n' }}
{%- endif -%}
"""

# Inside a message loop: `content` is the message's text (a string, or the
# text items of a list of content parts joined).
_TEXT_CONTENT = """    {%- if message['content'] is string -%}
        {%- set content = message['content'] -%}
    {%- else -%}
        {%- set content = namespace(text='') -%}
        {%- for item in message['content'] if item['type'] == 'text' -%}
            {%- set content.text = content.text + item['text'] -%}
        {%- endfor -%}
        {%- set content = content.text -%}
    {%- endif -%}
"""

# ChatML (Qwen, SmolLM, ...): `<|im_start|>{role}\n{content}<|im_end|>\n`.
_CHATML = """{%- for message in messages -%}
""" + _TEXT_CONTENT + """    {{ '<|im_start|>' + message['role'] + '\n' + content + '<|im_end|>\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{ '<|im_start|>assistant\n' }}
{%- endif -%}
"""

# Llama 3 (Meta's documented format): <|begin_of_text|>, then per message
# `<|start_header_id|>{role}<|end_header_id|>\n\n{content}<|eot_id|>`, content
# trimmed.
_LLAMA3 = """{{ bos_token }}
{%- for message in messages -%}
""" + _TEXT_CONTENT + """    {{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + content | trim + '<|eot_id|>' }}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}
{%- endif -%}
"""

# Llama 3.1 / 3.2 (Meta's documented format): as Llama 3, with a system
# turn that always opens with the knowledge cutoff and today's date
# (`date_string`, default: today as "26 Jul 2024").
_LLAMA32 = """{{ bos_token }}
{%- if not date_string is defined -%}
    {%- set date_string = strftime_now("%d %b %Y") -%}
{%- endif -%}
{%- if messages[0]['role'] == 'system' -%}
    {%- set system_message = messages[0]['content'] | trim -%}
    {%- set messages = messages[1:] -%}
{%- else -%}
    {%- set system_message = "" -%}
{%- endif -%}
{{ '<|start_header_id|>system<|end_header_id|>\n\n' }}
{{- 'Cutting Knowledge Date: December 2023\n' }}
{{- 'Today Date: ' + date_string + '\n\n' }}
{{- system_message + '<|eot_id|>' }}
{%- for message in messages -%}
    {{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}
{%- endif -%}
"""

_BUILTINS = {
    "gemma3": (_GEMMA3, {"bos_token": "<bos>", "eos_token": "<eos>"}),
    "chatml": (_CHATML, {"eos_token": "<|im_end|>"}),
    "llama3": (_LLAMA3, {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"}),
    "llama3.2": (_LLAMA32, {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"}),
}
_ALIASES = {"gemma": "gemma3", "gemma-3": "gemma3", "qwen": "chatml",
            "qwen2.5": "chatml", "smollm": "chatml", "llama-3": "llama3",
            "llama3.1": "llama3.2", "llama-3.2": "llama3.2", "llama-3.1": "llama3.2"}
BUILTIN_FAMILIES = tuple(_BUILTINS)


def builtin(family: str, **special) -> ChatTemplate:
    """A standard template for checkpoints without one: "gemma3", "chatml"
    (also "qwen"), "llama3" or "llama3.2" (Llama 3.1/3.2, with the dated
    system header), or a config.json model_type whose family spec names one
    (qwen2, qwen3: chatml; gemma3_text: gemma3).  Special tokens default to the family's own and may be
    overridden."""
    if not isinstance(family, str):
        raise TypeError(f"family: expected a string, got {type(family).__name__}")
    key = family.lower()
    key = _ALIASES.get(key, key)
    if key not in _BUILTINS:        # a model_type: its family spec's template, if it has one
        from mlxcy.models.families import MODEL_TYPES
        spec = MODEL_TYPES.get(key)
        key = spec.chat_template if spec is not None and spec.chat_template else key
    if key not in _BUILTINS:
        raise ValueError(f"family: unknown chat template family {family!r}; known: "
                         f"{', '.join(BUILTIN_FAMILIES)} (aliases: {', '.join(sorted(_ALIASES))})")
    src, toks = _BUILTINS[key]
    return ChatTemplate(src, **{**toks, **special})


def model_template(tokenizer, model_type, source=None) -> ChatTemplate:
    """A model's chat template: `source` (Jinja text) when given, else the
    tokenizer's own, else the builtin() one of its model_type; rendered with
    the tokenizer's BOS and EOS tokens (ValueError when there is none)."""
    def text(i):
        return tokenizer.id_to_token(i) if i is not None else None
    source = source or tokenizer.chat_template
    return ChatTemplate(source if source else builtin(model_type),
                        bos_token=text(tokenizer.bos_id), eos_token=text(tokenizer.eos_id))
