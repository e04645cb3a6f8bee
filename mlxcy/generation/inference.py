"""TextModel: load a model and stream text from a prompt or a chat.

    import mlxcy
    with mlxcy.load("SmolLM2-135M-Instruct.Q4_1.gguf") as m:
        print(m.generate("The capital of France is", max_tokens=16))
        for tok in m.stream_chat([{"role": "user", "content": "Hi!"}]):
            print(tok.text, end="", flush=True)

Backends: "mlx" (mlxcy's own Cython stack) and "mlx_lm" (an adapter over
mlx-lm, when installed) share the TextModel interface, so scripts and
benchmarks can swap them (`load(path, backend="mlx_lm")`).
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Callable, Iterator

from mlxcy.generation.api import (  # noqa: F401  (re-exported: mlxcy.generation.inference.X)
    BATCH_DOC, CLASSIFY_DOC, STREAM_CHAT_DOC, STREAM_DOC, STREAM_IDS_DOC,
    GenerationOptions, Metrics, TextModel, Token, options_doc, sampler_for)

__all__ = ["Token", "GenerationOptions", "Metrics", "TextModel", "MlxTextModel", "load",
           "register", "get", "list_backends", "default_backend", "set_default_backend",
           "load_model"]


class MlxTextModel(TextModel):
    """mlxcy's own backend: Cython decoder, samplers and token loop."""

    backend = "mlx"

    def __init__(self, path, dtype=None, chat_template: str | None = None, max_context=None,
                 fuse: bool | None = None, draft_model=None, num_draft: int = 4):
        from mlxcy import memory
        from mlxcy.distributed.parallel import load_model_for_process as load_model  # tensor parallel
        from mlxcy.tokenizer import Tokenizer
        self.path = Path(path)
        self._mem_before = memory.get_active_memory()
        self.model = load_model(self.path, dtype=dtype)
        try:
            if fuse is None:
                fuse = default_fuse()
            if fuse:   # one matmul for q/k/v and one for gate/up: same logits, fewer kernels
                self.model.fuse()
            self.tokenizer = Tokenizer.load(self.path)
        except Exception:
            self.model.close()
            raise
        self.max_context = max_context
        # speculative decoding with a draft model (same tokenizer): a path or an
        # MlxTextModel; every generation then drafts num_draft tokens per step
        self.draft_model = None
        self._own_draft = False
        self.num_draft = int(num_draft)
        if draft_model is not None:
            try:
                self._set_draft(draft_model, dtype, fuse)
            except Exception:
                self.model.close()
                raise
        self._template_str = chat_template or self.tokenizer.chat_template
        self._template = None
        self._metrics = Metrics()
        # Prompt-cache reuse across chat turns: the cache and the ids it holds.
        self._session_cache = None
        self._session_ids: list[int] = []
        self._closed = False

    def _set_draft(self, draft, dtype, fuse):
        from mlxcy.models.base import Model
        from mlxcy.models.load import load_model
        if isinstance(draft, MlxTextModel):
            draft = draft.model
        if not isinstance(draft, Model):
            p = Path(draft)
            if not p.exists():
                raise FileNotFoundError(f"draft_model: {p}: no such model file or directory")
            draft = load_model(p, dtype=dtype)
            self._own_draft = True
            if default_fuse() if fuse is None else fuse:
                draft.fuse()
        if draft.config.vocab_size != self.model.config.vocab_size:
            if self._own_draft:
                draft.close()
            raise ValueError(f"draft_model: its vocabulary ({draft.config.vocab_size} tokens) "
                             f"differs from the model's ({self.model.config.vocab_size}); a draft "
                             f"model must share the target's tokenizer")
        self.draft_model = draft

    # -- templates -------------------------------------------------------------
    def chat_template(self):
        from mlxcy.chat import model_template
        if self._template is None:
            self._template = model_template(self.tokenizer, self.model.config.model_type,
                                            self._template_str)
        return self._template

    def apply_chat_template(self, messages, add_generation_prompt=True, **kwargs) -> str:
        return self.chat_template().render(messages, add_generation_prompt=add_generation_prompt,
                                           **kwargs)

    # -- generation ------------------------------------------------------------
    def _check_open(self):
        if self._closed:
            raise ValueError("this model has been closed")

    @options_doc(STREAM_DOC)
    def stream(self, prompt: str, **opts) -> Iterator[Token]:
        self._check_open()
        o = GenerationOptions.from_kwargs(opts)
        if not isinstance(prompt, str):
            raise TypeError(f"prompt must be a str, got {type(prompt).__name__}")
        ids = self.tokenizer.encode(prompt, add_special_tokens=True)
        cache = self.model.make_cache()
        return self._run(ids, cache, o, own_cache=True)

    @options_doc(STREAM_IDS_DOC)
    def stream_ids(self, ids: list[int], **opts) -> Iterator[Token]:
        self._check_open()
        o = GenerationOptions.from_kwargs(opts)
        return self._run(list(ids), self.model.make_cache(), o, own_cache=True)

    @options_doc(STREAM_CHAT_DOC)
    def stream_chat(self, messages: list[dict], chat_kwargs: dict | None = None,
                    **opts) -> Iterator[Token]:
        self._check_open()
        o = GenerationOptions.from_kwargs(opts)
        text = self.apply_chat_template(messages, add_generation_prompt=True, **(chat_kwargs or {}))
        ids = self.tokenizer.encode(text, add_special_tokens=False)
        bos = self.tokenizer.bos_id
        if self.tokenizer.add_bos and bos is not None and (not ids or ids[0] != bos):
            ids = [bos] + ids
        cache, new_ids = self._reuse_session(ids, o)
        return self._run(new_ids, cache, o, own_cache=False, full_ids=ids)

    def _new_cache(self, o):
        from mlxcy.models.cache import quantized_cache
        return quantized_cache(self.model.make_cache(), o.kv_bits, o.kv_group_size)

    def _reuse_session(self, ids, o):
        """Trim the session cache to the longest common prefix with `ids`
        (a new cache when kv_bits changed)."""
        from mlxcy.models.cache import kv_quantization
        cache = self._session_cache
        if cache is not None and kv_quantization(cache) != kv_quantization(self._new_cache(o)):
            self.reset_session()
            cache = None
        if cache is None:
            cache = self._session_cache = self._new_cache(o)
            self._session_ids = []
        old = self._session_ids
        n = 0
        limit = min(len(old), len(ids) - 1)   # always prefill at least one token
        while n < limit and old[n] == ids[n]:
            n += 1
        if cache.offset != len(old) or not _trimmable(cache, len(old) - n):
            cache.free()
            cache = self._session_cache = self._new_cache(o)
            n = 0
        elif len(old) > n:
            cache.trim(len(old) - n)
        self._session_ids = list(ids[:n])
        return cache, ids[n:]

    def reset_session(self):
        """Forget the chat session's cache."""
        if self._session_cache is not None:
            self._session_cache.free()
        self._session_cache, self._session_ids = None, []

    def save_session(self, path):
        """Save the chat session's KV cache and its token ids (safetensors)."""
        from mlxcy.generation.cache_io import save_cache
        if self._session_cache is None:
            raise ValueError("no chat session to save")
        save_cache(path, self._session_cache, self._session_ids)

    def load_session(self, path):
        from mlxcy.generation.cache_io import load_cache
        self.reset_session()
        self._session_cache, self._session_ids = load_cache(path, self.model)

    def _run(self, ids, cache, o: GenerationOptions, own_cache, full_ids=None):
        from mlxcy import memory
        from mlxcy.generation.engine import check_ids
        limit = o.max_context or self.max_context
        prompt = full_ids if full_ids is not None else ids
        ids = check_ids(ids, self.model.config.vocab_size, "prompt")
        if limit and len(prompt) + o.max_tokens > limit:
            raise ValueError(f"prompt ({len(prompt)} tokens) + max_tokens ({o.max_tokens}) "
                             f"exceeds max_context ({limit})")
        memory.reset_peak_memory()
        m = self._metrics = Metrics(prompt_tokens=len(ids))
        return self._iterate(list(prompt), cache, o, own_cache, m)

    def _iterate(self, prompt, cache, o, own_cache, m):
        """One sequence on the engine (a batch of one): tokens in, text out.
        A chat session hands the engine its cache (holding a prefix of
        `prompt`) and takes it back, holding prompt + generated tokens."""
        from mlxcy import memory
        from mlxcy.generation.engine import Engine
        from mlxcy.generation.text_stream import TextStream
        t0 = time.perf_counter()
        eng = sid = None
        generated: list[int] = []
        reason = "length"
        back = None
        try:
            if o.max_tokens == 0 or o.cancelled():
                reason = "cancelled" if o.cancelled() else "length"
                return
            eng = Engine(self.model, max_batch=1, prefill_chunk=o.prefill_chunk,
                         kv_bits=o.kv_bits, kv_group_size=o.kv_group_size,
                         draft_model=self.draft_model, num_draft=self.num_draft)
            sid = eng.add(prompt, sampler=sampler_for(o), max_tokens=o.max_tokens,
                          stop_ids=set(self.tokenizer.eos_ids) | set(o.stop_ids),
                          logprobs=o.logprobs, cache=None if own_cache else cache,
                          keep_cache=not own_cache, prompt_lookup=o.prompt_lookup)
            if own_cache:
                cache.free()
            text = TextStream(self.tokenizer, o.stop)
            while eng.has_work():
                for ev in eng.step():
                    if not generated:
                        m.time_to_first_token = time.perf_counter() - t0
                        m.prefill_tokens_per_second = m.prompt_tokens / max(
                            eng.stats["prefill_seconds"], 1e-9)
                    generated.append(ev.token)
                    m.generated_tokens = len(generated)
                    back = ev.cache
                    if ev.finish_reason == "stop":
                        reason = "eos"
                        return
                    piece, hit = text.push(ev.token)
                    if piece or ev.logprob is not None:
                        yield Token(ev.token, piece, ev.logprob)
                    if hit:
                        reason = "stop"
                        return
                    if ev.finish_reason is not None:
                        break
                    if o.cancelled():
                        reason = "cancelled"
                        return
            tail = text.finish()
            if tail:
                yield Token(-1, tail, None)
        finally:
            if eng is not None:
                if eng.has_work():
                    back = eng.finish(sid, reason)
                eng.close()
            now = time.perf_counter()
            m.total_time = now - t0
            if m.generated_tokens > 1 and m.time_to_first_token:
                m.decode_tokens_per_second = (m.generated_tokens - 1) / max(
                    now - t0 - m.time_to_first_token, 1e-9)
            m.peak_memory = memory.get_peak_memory()
            m.stop_reason = reason
            if eng is not None:
                m.acceptance_rate = eng.stats["acceptance_rate"]
                m.tokens_per_step = eng.stats["tokens_per_step"]
            if not own_cache:
                self._keep_session(back, prompt + generated)
            m.active_memory = memory.get_active_memory()

    def _keep_session(self, cache, ids):
        """The session cache after a reply: it holds the first cache.offset
        of `ids` (prompt + generated tokens fed back)."""
        if cache is None:
            self.reset_session()
            return
        self._session_cache = cache
        self._session_ids = list(ids[:cache.offset])

    # -- batches -----------------------------------------------------------------
    def classify(self, prompts, *, labels=None, top_k=5, return_logits=False,
                 batch_size=None):
        self._check_open()
        from mlxcy.generation.batch import classify
        return classify(self, prompts, labels=labels, top_k=top_k,
                        return_logits=return_logits, batch_size=batch_size)

    classify.__doc__ = CLASSIFY_DOC

    @options_doc(BATCH_DOC)
    def batch_generate(self, prompts, *, options=None, batch_size=None, **opts):
        self._check_open()
        from mlxcy.generation.batch import batch_generate
        return batch_generate(self, prompts, options=options, batch_size=batch_size, **opts)

    # -- bookkeeping -----------------------------------------------------------
    def metrics(self) -> Metrics:
        return self._metrics

    def info(self) -> dict:
        self._check_open()
        d = dict(self.model.info())
        d["path"] = str(self.path)
        d["backend"] = self.backend
        return d

    def close(self) -> None:
        if self._closed:
            return
        self.reset_session()
        self.model.close()
        if self._own_draft and self.draft_model is not None:
            self.draft_model.close()
        self._closed = True


def default_fuse() -> bool:
    """Whether MlxTextModel fuses q/k/v and gate/up by default: on a GPU, yes
    (each matmul is a kernel launch, and fusing saves launches per token); on
    the CPU, no.  MLX's CPU kernels are not launch-bound, and there the slices
    of a fused output are strided views that the elementwise ops after them
    (rope, the compiled SwiGLU) read more slowly: SmolLM2-135M bf16 decoded and
    prefilled ~2-4% slower fused on the 2-core development VM (docs/benchmarks.md).
    With mlxcy.cpu_kernels (the CPU default) the products are ours: fused ones
    are fewer, larger ops per token, decode faster (docs/cpu.md)."""
    from mlxcy import cpu_kernels
    from mlxcy.device import default_device
    return default_device().type != "cpu" or cpu_kernels.enabled() is not False


def _trimmable(cache, n) -> bool:
    """Whether `cache.trim(n)` is exact (rotating caches that wrapped are not)."""
    if n == 0:
        return True
    try:
        return all(getattr(layer, "window", 0) == 0 or layer.offset <= layer.window
                   for layer in cache.layers)
    except AttributeError:
        return False


# ---------------------------------------------------------------- registry --

_BACKENDS: dict[str, Callable[..., TextModel]] = {}
_DEFAULT = ["mlx"]


def register(name: str, loader: Callable[..., TextModel]) -> None:
    """Register a backend: `loader(path, **options) -> TextModel`."""
    if not callable(loader):
        raise TypeError("loader must be callable")
    _BACKENDS[name] = loader


def get(name: str) -> Callable[..., TextModel]:
    try:
        return _BACKENDS[name]
    except KeyError:
        raise KeyError(f"unknown backend {name!r}; registered: {sorted(_BACKENDS)}") from None


def list_backends() -> list[str]:
    """Registered backends whose dependencies are importable."""
    out = []
    for name in sorted(_BACKENDS):
        if name == "mlx_lm":
            import importlib.util
            if importlib.util.find_spec("mlx_lm") is None:
                continue
        out.append(name)
    return out


def default_backend() -> str:
    return _DEFAULT[0]


def set_default_backend(name: str) -> None:
    get(name)
    _DEFAULT[0] = name


def load_model(path, backend: str | None = None, **options) -> TextModel:
    """Load `path` (a model directory or a .gguf file) with a backend."""
    return get(backend or default_backend())(path, **options)


def load(path, backend: str | None = None, **options) -> TextModel:
    """mlxcy.load(path_or_gguf, **options) -> TextModel (backend "mlx" by default)."""
    return load_model(path, backend=backend, **options)


register("mlx", MlxTextModel)


def _load_mlx_lm(path, **options):
    from mlxcy.backends.mlx_lm import MlxLmTextModel
    return MlxLmTextModel(path, **options)


register("mlx_lm", _load_mlx_lm)
