"""The generation interface every backend implements: the options a
generation call takes (GenerationOptions), what it yields (Token) and
measures (Metrics), and the TextModel methods with their documentation.
mlxcy's own backend (mlxcy.generation.inference.MlxTextModel), the mlx_lm
backend (mlxcy.backends.mlx_lm) and batch generation build on it.
"""
from __future__ import annotations

import dataclasses
import textwrap
import threading
from dataclasses import dataclass, asdict, field
from typing import Any, Callable, Iterator, NamedTuple, TypeVar

__all__ = ["Token", "GenerationOptions", "Metrics", "TextModel", "OPTION_HELP", "OPTIONS_DOC",
           "options_doc",
           "sampler_for"]


class Token(NamedTuple):
    """One generated token: its id, the text it completed, and its log-prob
    (None unless `logprobs=True`)."""
    id: int
    text: str
    logprob: float | None = None


@dataclass
class GenerationOptions:
    """Sampling and stopping options shared by every backend."""
    max_tokens: int = 256
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    repetition_context_size: int = 20
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict | None = None
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_ids: list[int] = field(default_factory=list)
    max_context: int | None = None
    logprobs: bool = False
    prefill_chunk: int | None = None   # None: the device's default (mlxcy.tuning)
    kv_bits: int | None = None     # quantize the KV cache (mlxcy.models.cache.QuantizedKVCache)
    kv_group_size: int = 64
    # speculative decoding by prompt lookup: True (up to engine.DEFAULT_LOOKUP tokens per step) or
    # an int k; greedy output is unchanged (mlxcy.generation.engine, "speculative decoding")
    prompt_lookup: bool | int | None = None
    cancel: object = None          # threading.Event, or a callable returning True to stop

    def __post_init__(self):
        """Every option checked by type and range, naming it (OptionTypeError,
        a TypeError, or OptionError, a ValueError); `stop` may be one string."""
        from mlxcy.errors import OptionError, OptionTypeError

        def integer(name, lo, hi=2**31 - 1, none=False):
            v = getattr(self, name)
            if v is None and none:
                return
            if type(v) is bool or not isinstance(v, int):
                if hasattr(v, "__index__") and type(v) is not bool:     # numpy ints
                    v = v.__index__()
                    setattr(self, name, v)
                else:
                    raise OptionTypeError(f"{name}: expected an int{' or None' if none else ''}"
                                          f", got {type(v).__name__} ({v!r:.40})")
            if not lo <= v <= hi:
                raise OptionError(f"{name}: must be in [{lo}, {hi}], got {v}")

        def number(name, lo=None, hi=None, lo_open=False):
            v = getattr(self, name)
            if type(v) is bool or not isinstance(v, (int, float)):
                try:
                    import numpy as np
                    ok = isinstance(v, (np.integer, np.floating))
                except ImportError:
                    ok = False
                if not ok:
                    raise OptionTypeError(f"{name}: expected a number, got "
                                          f"{type(v).__name__} ({v!r:.40})")
            v = float(v)
            setattr(self, name, v)
            if v != v or v in (float("inf"), float("-inf")):
                raise OptionError(f"{name}: must be finite, got {v}")
            if lo is not None and (v <= lo if lo_open else v < lo) or hi is not None and v > hi:
                rng = f"{'(' if lo_open else '['}{lo if lo is not None else '-inf'}, " \
                      f"{hi if hi is not None else 'inf'}]"
                raise OptionError(f"{name}: must be in {rng}, got {v}")

        integer("max_tokens", 0)
        number("temperature", 0.0)
        integer("top_k", 0)
        number("top_p", 0.0, 1.0, lo_open=True)
        number("min_p", 0.0, 1.0)
        number("repetition_penalty", 0.0, lo_open=True)
        integer("repetition_context_size", 1)
        number("presence_penalty")
        number("frequency_penalty")
        integer("max_context", 1, none=True)
        integer("prefill_chunk", 1, none=True)
        integer("kv_bits", 1, 8, none=True)
        integer("kv_group_size", 1)
        from mlxcy.models.cache import check_kv_options
        try:
            check_kv_options(self.kv_bits, self.kv_group_size)
        except ValueError as e:
            raise OptionError(str(e)) from None
        if self.prompt_lookup is not None and type(self.prompt_lookup) is not bool:
            integer("prompt_lookup", 0)
        if self.seed is not None:
            integer("seed", 0, 2**64 - 1)
        if self.logit_bias is not None:
            if not isinstance(self.logit_bias, dict):
                raise OptionTypeError(f"logit_bias: expected a dict {{token_id: bias}}, got "
                                      f"{type(self.logit_bias).__name__}")
            for k, v in self.logit_bias.items():
                if type(k) is not int or k < 0:
                    raise OptionError(f"logit_bias: key {k!r:.40} is not a token id")
                if type(v) is bool or not isinstance(v, (int, float)) or v != v:
                    raise OptionTypeError(f"logit_bias[{k}]: expected a number, got {v!r:.40}")
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if not isinstance(self.stop, (list, tuple)) or \
                not all(isinstance(x, str) for x in self.stop):
            raise OptionTypeError(f"stop: expected a string or a list of strings, got "
                                  f"{type(self.stop).__name__} ({self.stop!r:.40})")
        if any(not x for x in self.stop):
            raise OptionError("stop: stop strings must not be empty")
        self.stop = list(self.stop)
        if not isinstance(self.stop_ids, (list, tuple)) or \
                not all(type(x) is int and x >= 0 for x in self.stop_ids):
            raise OptionTypeError(f"stop_ids: expected a list of token ids (ints >= 0), got "
                                  f"{self.stop_ids!r:.40}")
        self.stop_ids = list(self.stop_ids)
        if not isinstance(self.logprobs, bool):
            raise OptionTypeError(f"logprobs: expected a bool, got {type(self.logprobs).__name__}")
        c = self.cancel
        if c is not None and not isinstance(c, threading.Event) and not callable(c):
            raise OptionTypeError(f"cancel: expected a threading.Event or a callable, got "
                                  f"{type(c).__name__}")

    @classmethod
    def from_kwargs(cls, kwargs: dict) -> "GenerationOptions":
        from mlxcy.errors import OptionTypeError
        names = set(cls.__dataclass_fields__)
        unknown = sorted(set(kwargs) - names)
        if unknown:
            raise OptionTypeError(f"unknown generation option(s): {', '.join(unknown)}")
        return cls(**kwargs)

    def cancelled(self) -> bool:
        c = self.cancel
        if c is None:
            return False
        if isinstance(c, threading.Event):
            return c.is_set()
        return bool(c())


# Every GenerationOptions field in one line (or two): the generation methods'
# docstrings list them all (tests/generation/test_api_docs.py checks that),
# and the `mlxcy generate/chat` flags take their help from here.
OPTION_HELP = {
    "max_tokens": "most tokens to generate (0: none)",
    "temperature": "sampling temperature; 0 is greedy",
    "top_k": "keep the k most likely tokens (0: all)",
    "top_p": "nucleus sampling: the smallest set with this probability mass",
    "min_p": "drop tokens below min_p times the top token's probability",
    "repetition_penalty": "divide the logits of recent tokens by this (1: off)",
    "repetition_context_size": "how many recent tokens repetition_penalty looks at",
    "presence_penalty": "subtracted from the logits of tokens already generated",
    "frequency_penalty": "subtracted per occurrence of a token already generated",
    "logit_bias": "{token id: added logit}",
    "seed": "random seed for sampling",
    "stop": "stop strings (a str or a list); the text stops before them",
    "stop_ids": "token ids that end generation (besides the tokenizer's EOS)",
    "max_context": "refuse prompt + max_tokens beyond this many tokens",
    "logprobs": "give each Token its log-probability",
    "prefill_chunk": "prompt tokens per prefill step (None: the device's default)",
    "kv_bits": "quantize the KV cache to 2-8 bits (None: float); sliding-window layers "
               "stay float",
    "kv_group_size": "elements per scale and bias of the quantized KV cache (32, 64, 128)",
    "prompt_lookup": "speculative decoding by prompt lookup: True (up to 15 draft tokens per "
                     "step) or an int k; greedy output is unchanged",
    "cancel": "a threading.Event, or a callable returning True, that stops generation",
}


def _options_table() -> str:
    lines = ["", "Options (keywords; GenerationOptions fields):"]
    for f in dataclasses.fields(GenerationOptions):
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        head = f"    {f.name}={default!r}"
        text = textwrap.wrap(OPTION_HELP[f.name], 68)
        lines.append(f"{head:<28}{text[0]}" if len(head) < 28 else f"{head}  {text[0]}")
        lines += [" " * 28 + t for t in text[1:]]
    lines.append("Unknown names raise TypeError; out-of-range values ValueError naming the option.")
    return "\n".join(lines) + "\n"


OPTIONS_DOC = _options_table()


_F = TypeVar("_F", bound=Callable[..., Any])
_TM = TypeVar("_TM", bound="TextModel")


def options_doc(summary: str) -> Callable[[_F], _F]:
    """Decorator: the method's docstring is `summary` plus OPTIONS_DOC.
    (Typed so that type checkers keep the decorated method's signature.)"""
    def deco(fn: _F) -> _F:
        fn.__doc__ = summary.rstrip() + "\n" + OPTIONS_DOC
        return fn
    return deco


GENERATE_DOC = "Generate a continuation of a plain-text prompt; returns the text."
CHAT_DOC = ("Reply to a conversation, messages = [{'role': 'system'|'user'|'assistant', "
         "'content': str}, ...];\nreturns the reply's text.")
STREAM_DOC = "Stream the continuation of a plain-text prompt as Token(id, text, logprob) items."
STREAM_CHAT_DOC = ("Stream the reply to `messages` as Token items.  The mlx backend keeps the\n"
                "session's KV cache: a next turn that extends this one prefills only the new\n"
                "tokens (chat_kwargs: extra variables for the chat template).")
STREAM_IDS_DOC = "Stream the continuation of a prompt given as token ids."
BATCH_DOC = ("Decode many prompts together; returns a BatchGeneration (input order).\n"
          "options: a list of one dict per prompt overriding the keyword options for it\n"
          "(logprobs, prefill_chunk, kv_bits, kv_group_size and cancel are batch-wide);\n"
          "batch_size: most prompts decoding at once (default: all).  Greedy decoding\n"
          "gives each prompt's single-prompt tokens (mlxcy.generation.batch.batch_generate).")
CLASSIFY_DOC = """The next-token distribution after each prompt, in batches; one
ClassifyResult per prompt (input order).

    labels=None          candidate continuations: each gets its log-likelihood
                         (teacher-forced over its tokens) in .scores, the best in .label
    top_k=5              the top_k most likely next tokens (.top_ids, .top_probs)
    return_logits=False  also give the raw last-position logits (.logits)
    batch_size=None      prompts per forward (default 16), bucketed by length
"""


@dataclass
class Metrics:
    """Figures of the last generate/stream call."""
    prompt_tokens: int = 0
    generated_tokens: int = 0
    time_to_first_token: float = 0.0
    prefill_tokens_per_second: float = 0.0
    decode_tokens_per_second: float = 0.0
    total_time: float = 0.0
    peak_memory: int = 0
    active_memory: int = 0
    stop_reason: str = ""
    # speculative decoding: accepted / proposed tokens, and tokens per decode step
    acceptance_rate: float = 0.0
    tokens_per_step: float = 0.0

    def as_dict(self) -> dict:
        return asdict(self)

    def format(self) -> str:
        mb = 1 << 20
        return (f"prompt {self.prompt_tokens} tok, {self.prefill_tokens_per_second:.1f} tok/s | "
                f"generated {self.generated_tokens} tok, {self.decode_tokens_per_second:.1f} tok/s | "
                f"first token {self.time_to_first_token * 1e3:.0f} ms | total {self.total_time:.2f} s | "
                f"peak {self.peak_memory / mb:.1f} MB, active {self.active_memory / mb:.1f} MB"
                f" | stop: {self.stop_reason}"
                + (f" | speculative: {self.acceptance_rate:.0%} accepted, "
                   f"{self.tokens_per_step:.2f} tok/step" if self.tokens_per_step > 1.0 else ""))


class TextModel:
    """The interface every backend implements."""

    backend = "?"

    @options_doc(GENERATE_DOC)
    def generate(self, prompt: str, **opts) -> str:
        return "".join(t.text for t in self.stream(prompt, **opts))

    @options_doc(CHAT_DOC)
    def chat(self, messages: list[dict], **opts) -> str:
        return "".join(t.text for t in self.stream_chat(messages, **opts))

    @options_doc(STREAM_DOC)
    def stream(self, prompt: str, **opts) -> Iterator[Token]:
        raise NotImplementedError

    @options_doc(STREAM_CHAT_DOC)
    def stream_chat(self, messages: list[dict], **opts) -> Iterator[Token]:
        raise NotImplementedError

    def info(self) -> dict:
        raise NotImplementedError

    def metrics(self) -> Metrics:
        raise NotImplementedError

    def classify(self, prompts, *, labels=None, top_k=5, return_logits=False,
                 batch_size=None):
        raise NotImplementedError(f"classify is not available with the {self.backend!r} backend")

    classify.__doc__ = CLASSIFY_DOC

    @options_doc(BATCH_DOC)
    def batch_generate(self, prompts, *, options=None, batch_size=None, **opts):
        raise NotImplementedError(
            f"batch_generate is not available with the {self.backend!r} backend")

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self: _TM) -> _TM:
        return self

    def __exit__(self, *exc: object) -> bool:
        self.close()
        return False


def sampler_for(o: GenerationOptions):
    """The Sampler a GenerationOptions asks for."""
    from mlxcy.generation.sample import Sampler
    return Sampler(temperature=o.temperature, top_k=o.top_k, top_p=o.top_p, min_p=o.min_p,
                   repetition_penalty=o.repetition_penalty,
                   repetition_context_size=o.repetition_context_size,
                   presence_penalty=o.presence_penalty, frequency_penalty=o.frequency_penalty,
                   logit_bias=o.logit_bias, seed=o.seed)
