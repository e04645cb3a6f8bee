"""Speculative decoding on the engine (mlxcy.generation.engine): prompt lookup and draft
models verify several proposed tokens per row in one forward.

Greedy: the tokens must be exactly plain greedy decoding's (the reference is
the engine without speculation, itself tested against transformers in
tests/generation/test_engine.py), for one sequence and for batches whose rows accept
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

from mlxcy.generation.engine import Engine
from mlxcy.generation.engine import lookup_proposals as engine_lookup
from mlxcy.generation.sample import Sampler
from mlxcy.models import base
from mlxcy.models.load import load_model
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


@pytest.fixture(autouse=True)
def _batch_steps_op_by_op():
    """Where the GPU kernel runs a batch's plain steps the engine proposes
    nothing for a batch (Engine._row_k); these tests check batched
    verification itself, so a batch's steps run op by op there (a no-op on
    the CPU)."""
    old = base.set_gpu_rows_step(False)
    yield
    base.set_gpu_rows_step(old)


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


def test_a_batch_proposes_nothing_where_the_gpu_kernel_runs_its_steps(tiny):
    base.set_gpu_rows_step(True)
    if not base.gpu_rows_kernel(tiny.m):
        pytest.skip("the GPU kernel does not run this model's batches on this device")
    ps = _prompts(2)
    ref, _, _ = _run(tiny.m, ps, 30)
    got, _, st = _run(tiny.m, ps, 30, lookup=True)
    assert got == ref
    assert st["proposed_tokens"] == 0 and st["spec_steps"] == 0


@pytest.mark.parametrize("ids, k, want", [
    # the latest earlier occurrence of the last 3 ids: 3 ids agree (no id before it)
    ([1, 2, 3, 4, 5, 9, 9, 1, 2, 3], 5, ([4, 5, 9, 9, 1], 3)),
    # a loop: the continuation runs into the end and repeats its period (4 ids);
    # the match agrees back to the 7 before the first 1
    ([7, 1, 2, 3, 4, 1, 2, 3, 4, 1, 2, 3], 10, ([4, 1, 2, 3, 4, 1, 2, 3, 4, 1], 7)),
    # no 3-id match: the last 2 ids (period 4 past the end)
    ([5, 6, 8, 9, 7, 5, 6], 6, ([8, 9, 7, 5, 6, 8], 2)),
    # the agreement counts up to 16 ids
    (list(range(30)) * 2, 3, ([0, 1, 2], 16)),
    ([1, 2, 3, 4], 5, ([], 0)),          # nothing repeats
    ([1, 2, 1, 2], 0, ([], 0)),          # k = 0 proposes nothing
])
def test_lookup_proposals_exact(ids, k, want):
    from mlxcy.generation.engine import lookup_proposals
    assert lookup_proposals(ids, k) == want


def test_lookup_proposals_rejects_negative_k():
    from mlxcy.generation.engine import lookup_proposals
    with pytest.raises(ValueError, match="k must be >= 0"):
        lookup_proposals([1, 2, 1], -1)


def test_proposals_keep_their_length_where_lengths_do_not_adapt(tiny):
    """tuning's lookup_adapt=False (automatic where the GPU kernel verifies):
    every proposal is as long as the lookup gives, the tokens are plain
    greedy decoding's, and a verification proposes more tokens on average
    than with adapting lengths (which start at 2) on the same prompts."""
    from mlxcy import tuning
    per_step = {}
    for adapt in (True, False):
        proposed = steps = 0
        with tuning.override(lookup_adapt=adapt):
            for p in _prompts(4):
                ref, _, _ = _run(tiny.m, [p], 40)
                got, _, st = _run(tiny.m, [p], 40, lookup=6)
                assert got == ref
                proposed += st["proposed_tokens"]
                steps += st["spec_steps"]
            ps = _prompts(2)
            ref, _, _ = _run(tiny.m, ps, [30, 23])
            got, _, st = _run(tiny.m, ps, [30, 23], lookup=True)
            assert got == ref and st["proposed_tokens"] > 0
        per_step[adapt] = proposed / steps
    assert per_step[False] > per_step[True] > 1


@pytest.mark.parametrize("agree", [2, 5])
def test_sampled_rows_propose_only_long_matches_where_lengths_do_not_adapt(tiny, agree):
    """A sampled row keeps a proposed token with the target's probability of
    it; where every proposal is as long as the lookup gives (lookup_adapt
    False, the GPU kernel's), a sampled row proposes only on a match of
    LONG_MATCH (4) ids or more.  The prompt holds A F F F F F B once, after
    `agree` - 2 ids that the end of the prompt repeats before its A; the row
    gives F at every step (logit_bias), so its one lookup (max_tokens 4)
    matches A F with `agree` ids agreeing.  A greedy row, and a sampled one
    with adapting lengths, propose on any match."""
    from mlxcy import tuning
    rng = np.random.default_rng(5)
    A, F, B = 5, 7, 9
    lead = [11, 13, 15, 17][:agree - 2]
    r1, r2 = rng.integers(20, VOCAB, 6).tolist(), rng.integers(20, VOCAB, 6).tolist()
    r2[-1] = (r1[-1] + 1 - 20) % (VOCAB - 20) + 20      # the agreement stops there
    prompt = r1 + lead + [A, F, F, F, F, F, B] + r2 + lead + [A]
    assert engine_lookup(prompt + [F], 6)[1] == agree
    proposed = {}
    for adapt in (False, True):
        with tuning.override(lookup_adapt=adapt):
            for name, t in (("greedy", 0.0), ("sampled", 1.0)):
                forced = Sampler(temperature=t, logit_bias={F: 60.0}, seed=0)
                got, _, st = _run(tiny.m, [prompt], 4, lookup=6, samplers=[forced])
                assert got[0] == [F] * 4
                proposed[adapt, name] = st["proposed_tokens"]
    assert proposed[True, "greedy"] > 0 and proposed[False, "greedy"] > 0
    assert proposed[True, "sampled"] > 0
    assert (proposed[False, "sampled"] > 0) == (agree >= 4), proposed


@pytest.fixture
def chained():
    """Chaining on (off by default), with adapting proposal lengths (the
    CPU's; on a GPU the prompts below then also drop a chained step)."""
    from mlxcy import tuning
    with tuning.override(lookup_chain=True, lookup_adapt=True):
        yield


def test_chained_lookup_is_plain_greedy(tiny, chained):
    """A verification queued before the one before it is read: the same
    tokens and finish reasons as plain greedy decoding, for lengths that end
    inside a verification or on its last token and for stop tokens taken
    from the reference.  Chained steps ran, some were used and some were
    dropped after a rejection (a cache with sliding windows, Gemma's, never
    chains)."""
    used = wasted = 0
    for p in _prompts(4):
        ref, _, _ = _run(tiny.m, [p], 40)
        for n in (1, 2, 3, 5, 17, 40):
            got, reasons, st = _run(tiny.m, [p], n, lookup=6)
            assert got[0] == ref[0][:n] and reasons == ["length"], n
            used += st["chained_used"]
            wasted += st["chained_steps"] - st["chained_used"]
        for j in (4, 11, 23):
            stop = ref[0][j]
            got, reasons, st = _run(tiny.m, [p], 40, lookup=6, stops=[{stop}])
            assert got[0] == ref[0][:ref[0].index(stop) + 1] and reasons == ["stop"]
    if tiny.kind == "gemma3_text":
        assert used == wasted == 0
    else:
        assert used > 0 and wasted > 0, (used, wasted)


def test_chained_lookup_cache_handed_back_and_rows_joining(tiny, chained):
    """finish() while a chained verification is queued hands back the cache
    of the prompt + the tokens emitted so far (continuing from it gives plain
    greedy's tokens), and a sequence added meanwhile joins the batch (chaining
    stops) with both outputs plain greedy's."""
    if tiny.kind == "gemma3_text":
        pytest.skip("a cache with sliding windows never chains")
    p, q = _prompts(2)
    ref, _, _ = _run(tiny.m, [p], 40)
    ref_q, _, _ = _run(tiny.m, [q], 25)
    for stop_at in (6, 14):
        eng = Engine(tiny.m, max_batch=2, prefill_chunk=5)
        sid = eng.add(p, max_tokens=40, prompt_lookup=6, keep_cache=True)
        toks = []
        while len(toks) < stop_at or eng.stats["chained_steps"] == eng.stats["chained_used"]:
            toks += [ev.token for ev in eng.step()]
            assert eng.has_work(), "no chained verification was queued"
        cache = eng.finish(sid)
        eng.close()
        assert toks == ref[0][:len(toks)]
        assert cache.offset == len(p) + len(toks)
        eng = Engine(tiny.m)
        eng.add(p + toks + [ref[0][len(toks)]], max_tokens=8, cache=cache)
        cont = [ev.token for _ in range(100) if eng.has_work() for ev in eng.step()]
        eng.close()
        assert cont == ref[0][len(toks) + 1:len(toks) + 9]
    eng = Engine(tiny.m, max_batch=2, prefill_chunk=5)
    a = eng.add(p, max_tokens=40, prompt_lookup=6)
    out = {}
    while eng.stats["chained_steps"] == 0 and eng.has_work():
        for ev in eng.step():
            out.setdefault(ev.seq_id, []).append(ev.token)
    b = eng.add(q, max_tokens=25, prompt_lookup=6)
    while eng.has_work():
        for ev in eng.step():
            out.setdefault(ev.seq_id, []).append(ev.token)
    eng.close()
    assert out[a] == ref[0] and out[b] == ref_q[0]


def _lookup_events(model, prompts, max_tokens, lookup, samplers=None, logprobs=False):
    """Each sequence's events from one engine (prompt lookup), in order, and
    the number of verification steps."""
    eng = Engine(model, max_batch=len(prompts), prefill_chunk=5)
    sids = [eng.add(p, max_tokens=max_tokens, prompt_lookup=lookup, logprobs=logprobs,
                    sampler=None if samplers is None else samplers[i])
            for i, p in enumerate(prompts)]
    out = {}
    while eng.has_work():
        for ev in eng.step():
            out.setdefault(ev.seq_id, []).append(ev)
    steps = eng.stats["spec_steps"]
    eng.close()
    return [out[s] for s in sids], steps


def test_greedy_acceptance_on_the_host_and_in_the_graph_agree(tiny):
    """A batch whose rows are all greedy, without log-probs, compares the
    candidates with the proposals on the host; with log-probs asked, or a
    sampled row in the batch, the comparison stays in the graph.  Either way
    the greedy rows are plain greedy decoding, and their log-probs are plain
    decoding's."""
    ps = _prompts(2)
    ref, _ = _lookup_events(tiny.m, ps, 30, None, logprobs=True)
    host, n_host = _lookup_events(tiny.m, ps, 30, 6)
    graph, n_graph = _lookup_events(tiny.m, ps, 30, 6, logprobs=True)
    mixed, n_mixed = _lookup_events(tiny.m, ps, 30, 6,
                                    samplers=[None, Sampler(temperature=1.0, seed=3)])
    assert min(n_host, n_graph, n_mixed) > 0
    for r in range(2):
        want = [e.token for e in ref[r]]
        assert [e.token for e in host[r]] == want
        assert [e.token for e in graph[r]] == want
        np.testing.assert_allclose([e.logprob for e in graph[r]], [e.logprob for e in ref[r]],
                                   rtol=1e-4, atol=1e-4)
    assert [e.token for e in mixed[0]] == [e.token for e in ref[0]]


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


def test_sampled_tokens_follow_the_target_distribution(tiny):
    """Speculative sampling keeps the target's distribution.  The vocabulary
    is cut to 5 tokens by logit_bias; 600 seeded rows sample 3 tokens each;
    the 2nd and 3rd (the first ones verified) are compared with their exact
    marginals, computed from the model's own probabilities over every
    possible prefix.  Chi-square, false-alarm rate 1e-3 per comparison;
    the rng seeds are fixed, so the test is deterministic."""
    from scipy.stats import chisquare
    allowed = [3, 17, 40, 41, 77]
    bias = {t: -1e4 for t in range(VOCAB) if t not in allowed}
    a = [allowed[i] for i in np.random.default_rng(5).integers(0, 5, 12)]
    prompt = a + a

    def probs(ids):
        lg = np.asarray(tiny.m(np.asarray([ids], np.int32)).astype("float32"))[0, -1]
        x = np.full(VOCAB, -np.inf)
        x[allowed] = lg[allowed]
        e = np.exp(x - x.max())
        return e / e.sum()

    p0 = probs(prompt)
    m1 = np.zeros(VOCAB)
    m2 = np.zeros(VOCAB)
    for t0 in allowed:
        p1 = probs(prompt + [t0])
        m1 += p0[t0] * p1
        for t1 in allowed:
            m2 += p0[t0] * p1[t1] * probs(prompt + [t0, t1])
    n = 600
    for how in ("lookup", "draft"):
        samplers = [Sampler(temperature=1.0, logit_bias=bias, seed=1000 + i) for i in range(n)]
        # (batches of 4: larger ones propose less or nothing, Engine._row_k)
        toks, _, st = _run(tiny.m, [prompt] * n, 3, samplers=samplers, max_batch=4,
                           lookup=4 if how == "lookup" else None,
                           draft=tiny.near if how == "draft" else None, num_draft=2)
        assert st["proposed_tokens"] > 0 and 0 < st["acceptance_rate"] < 1, (how, st)
        for pos, m in ((1, m1), (2, m2)):
            counts = np.bincount([t[pos] for t in toks], minlength=VOCAB)[allowed]
            exp = m[allowed] * n
            keep = exp > 0
            assert counts[~keep].sum() == 0
            assert chisquare(counts[keep], exp[keep] * counts.sum() / exp[keep].sum()).pvalue > 1e-3, \
                (how, pos, counts, exp)


def _smollm2():
    from mlxcy.assets import AssetMissing, smollm2_gguf
    try:
        return smollm2_gguf()
    except AssetMissing as e:
        pytest.skip(str(e))


QUOTE = ("Summarize the report, quoting it.\n\nReport: The bridge on Route 9 will close for "
         "repairs from March 3 to March 17. Drivers should use the detour through Elm Street "
         "and Oak Avenue. Buses 12 and 14 will stop at the temporary station near the library. "
         "The city expects the repairs to cost 2.4 million dollars.\n\nSummary: The report says "
         "that \"the bridge on Route 9 will close")


def test_smollm2_prompt_lookup_and_draft_single_and_batched():
    import mlxcy
    from mlxcy.generation.batch import batch_generate
    path = _smollm2()
    tm = mlxcy.load(path)
    prompts = [QUOTE, "Write a haiku about the sea."]
    try:
        ref = [list(t.id for t in tm.stream(p, max_tokens=32)) for p in prompts]
        got = [list(t.id for t in tm.stream(p, max_tokens=32, prompt_lookup=True)) for p in prompts]
        assert got == ref
        assert tm.metrics().tokens_per_step >= 1.0
        b = batch_generate(tm, prompts, max_tokens=32, prompt_lookup=True)
        assert b.token_ids == [r[:len(x)] for r, x in zip(ref, b.token_ids)]
        assert [len(x) for x in b.token_ids] == [len(r) for r in ref]
        assert b.metrics.acceptance_rate > 0 and b.metrics.tokens_per_step > 1.2
    finally:
        tm.close()
    # a draft model: the same weights loaded again (acceptance 1: every path of a
    # partial acceptance is covered by the tiny models above)
    td = mlxcy.load(path, draft_model=path, num_draft=3)
    try:
        got = [list(t.id for t in td.stream(p, max_tokens=32)) for p in prompts]
        assert got == ref
        assert td.metrics().acceptance_rate > 0.9
        b = batch_generate(td, prompts, max_tokens=32)
        assert b.token_ids == ref
    finally:
        td.close()
