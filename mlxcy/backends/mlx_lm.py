"""The "mlx_lm" backend: mlx-lm behind mlxcy's TextModel interface, so users
and benchmarks can swap engines on the same weights.

mlx-lm reads Hugging Face / MLX directories; a GGUF file is first converted
to a Hugging Face directory (cached next to the other mlxcy assets).
"""
from __future__ import annotations

import time
from pathlib import Path

from mlxcy.generation.api import (GenerationOptions, Metrics, TextModel, Token, options_doc,
                                  STREAM_DOC, STREAM_IDS_DOC, STREAM_CHAT_DOC)


def hf_dir_for(path: Path, dtype: str = "float32") -> Path:
    """A Hugging Face directory for `path`: itself, or its GGUF converted once."""
    path = Path(path)
    if path.is_dir():
        return path
    from mlxcy.assets import cache_dir
    from mlxcy.models.convert import convert_gguf_to_hf
    st = path.stat()
    out = cache_dir() / "hf" / f"{path.stem}-{st.st_size}-{int(st.st_mtime)}-{dtype}"
    if not (out / "config.json").exists():
        tmp = out.with_name(out.name + ".tmp")
        convert_gguf_to_hf(path, tmp, dtype=dtype)
        tmp.rename(out)
    return out


class MlxLmTextModel(TextModel):
    backend = "mlx_lm"

    def __init__(self, path, dtype: str | None = None, **_ignored):
        import mlx_lm
        self.path = Path(path)
        self.model, self.tokenizer = mlx_lm.load(str(hf_dir_for(self.path, dtype or "float32")))
        self._metrics = Metrics()

    def _sampler(self, o: GenerationOptions):
        from mlx_lm.sample_utils import make_logits_processors, make_sampler
        if o.seed is not None:
            import mlx.core as mx
            mx.random.seed(o.seed)
        sampler = make_sampler(temp=o.temperature, top_p=o.top_p, min_p=o.min_p, top_k=o.top_k)
        procs = make_logits_processors(
            logit_bias=o.logit_bias,
            repetition_penalty=o.repetition_penalty if o.repetition_penalty != 1.0 else None,
            repetition_context_size=o.repetition_context_size,
            presence_penalty=o.presence_penalty or None,
            frequency_penalty=o.frequency_penalty or None)
        return sampler, procs

    @options_doc(STREAM_DOC)
    def stream(self, prompt, **opts):
        o = GenerationOptions.from_kwargs(opts)
        ids = self.tokenizer.encode(prompt)
        return self._run(ids, o)

    @options_doc(STREAM_IDS_DOC)
    def stream_ids(self, ids, **opts):
        return self._run(list(ids), GenerationOptions.from_kwargs(opts))

    @options_doc(STREAM_CHAT_DOC)
    def stream_chat(self, messages, chat_kwargs=None, **opts):
        o = GenerationOptions.from_kwargs(opts)
        ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                                 **(chat_kwargs or {}))
        if isinstance(ids, str):
            ids = self.tokenizer.encode(ids, add_special_tokens=False)
        return self._run(list(ids), o)

    def _run(self, ids, o):
        """mlx-lm's stream_generate under mlxcy's options: stop ids and the
        tokenizer's EOS end the stream ("eos"), stop strings are matched on
        the text as mlxcy's backend matches them ("stop"), logprobs come
        from mlx-lm's per-step log-probabilities, max_context is checked."""
        import mlx_lm
        from mlxcy.generation.text_stream import StopMatcher
        limit = o.max_context
        if limit and len(ids) + o.max_tokens > limit:
            raise ValueError(f"prompt ({len(ids)} tokens) + max_tokens ({o.max_tokens}) "
                             f"exceeds max_context ({limit})")
        sampler, procs = self._sampler(o)
        m = self._metrics = Metrics(prompt_tokens=len(ids))
        t0 = time.perf_counter()
        stops = set(o.stop_ids) | set(getattr(self.tokenizer, "eos_token_ids", ()) or ())
        matcher = StopMatcher(o.stop)
        m.stop_reason = "length"
        if o.max_tokens == 0 or o.cancelled():
            m.stop_reason = "cancelled" if o.cancelled() else "length"
            return
        # prefill_chunk None: mlx-lm's own default step (2048)
        kv = {} if o.kv_bits is None else {"kv_bits": o.kv_bits,
                                           "kv_group_size": o.kv_group_size,
                                           "quantized_kv_start": 0}
        for r in mlx_lm.stream_generate(self.model, self.tokenizer, ids, max_tokens=o.max_tokens,
                                        sampler=sampler, logits_processors=procs,
                                        prefill_step_size=o.prefill_chunk or 2048, **kv):
            m.generated_tokens = r.generation_tokens
            m.prefill_tokens_per_second = r.prompt_tps
            m.decode_tokens_per_second = r.generation_tps
            m.peak_memory = int(r.peak_memory * 1e9)
            if not m.time_to_first_token:
                m.time_to_first_token = time.perf_counter() - t0
            if int(r.token) in stops:
                m.stop_reason = "eos"
                break
            text, hit = matcher.feed(r.text)
            lp = float(r.logprobs[int(r.token)]) if o.logprobs else None
            if text or lp is not None:
                yield Token(int(r.token), text, lp)
            if hit:
                m.stop_reason = "stop"
                break
            if o.cancelled():
                m.stop_reason = "cancelled"
                break
        else:
            tail = matcher.flush()
            if tail:
                yield Token(-1, tail, None)
        m.total_time = time.perf_counter() - t0

    def metrics(self):
        return self._metrics

    def info(self):
        return {"path": str(self.path), "backend": self.backend}

    def close(self):
        self.model = None
