"""The generation engine (mlxcy.generation.engine): sequences that join and leave a
running batch, at different positions, on tiny fp32 random-weight models
(Qwen3, and Gemma 3 with an 8-token sliding window, so rows run past the
window).  The reference for every greedy continuation is transformers: the
same model run on the whole sequence at every step, no cache."""
from types import SimpleNamespace

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from mlxcy.generation.engine import Engine, check_ids
from mlxcy.models.load import load_model
from mlxcy.generation.sample import Sampler
from tiny_models import VOCAB, make_tiny


@pytest.fixture(scope="module", params=["qwen3", "gemma3_text"])
def tiny(request, tmp_path_factory):
    d = tmp_path_factory.mktemp(request.param)
    hf = make_tiny(request.param, d)
    with torch.no_grad():        # wide logits: no greedy near-ties between engines
        hf.model.embed_tokens.weight.mul_(8.0)
    hf.save_pretrained(d, safe_serialization=True)
    m = load_model(d, dtype="float32")
    yield SimpleNamespace(hf=hf.eval(), m=m, kind=request.param)
    m.close()


def _hf_greedy(hf, ids, n, stop=()):
    ids = list(ids)
    out = []
    with torch.no_grad():
        for _ in range(n):
            t = int(hf(torch.tensor([ids])).logits[0, -1].argmax())
            out.append(t)
            if t in stop:
                break
            ids.append(t)
    return out


def _hf_logprobs(hf, ids):
    with torch.no_grad():
        return torch.log_softmax(hf(torch.tensor([ids])).logits[0, -1].double(), -1).numpy()


def _prompt(seed, n):
    return np.random.default_rng(seed).integers(0, VOCAB, n).tolist()


def _drain(eng, out=None, max_steps=10_000):
    out = {} if out is None else out
    for _ in range(max_steps):
        if not eng.has_work():
            return out
        for ev in eng.step():
            out.setdefault(ev.seq_id, []).append(ev)
    raise AssertionError("the engine did not finish")


def test_one_sequence_equals_transformers(tiny):
    ids = _prompt(1, 11)
    eng = Engine(tiny.m, max_batch=1, prefill_chunk=4)
    sid = eng.add(ids, max_tokens=12)
    evs = _drain(eng)[sid]
    assert [e.token for e in evs] == _hf_greedy(tiny.hf, ids, 12)
    assert evs[-1].finish_reason == "length"
    assert all(e.finish_reason is None for e in evs[:-1])
    assert eng.num_running == 0 and eng.num_waiting == 0


def test_sequences_join_a_running_batch_at_other_positions(tiny):
    """Prompts of different lengths, added while others decode (and past the
    Gemma window of 8), give the tokens each gives alone; max_batch bounds
    the running rows and waiting prompts take the rows that free up."""
    eng = Engine(tiny.m, max_batch=3, prefill_chunk=5)
    prompts = {eng.add(_prompt(2, 3), max_tokens=14): (_prompt(2, 3), 14)}
    running = []
    for step in range(60):
        if step == 2:
            p = _prompt(3, 17)
            prompts[eng.add(p, max_tokens=6)] = (p, 6)
        if step == 5:
            for seed, n, k in ((4, 1, 9), (5, 9, 11), (6, 4, 3)):
                p = _prompt(seed, n)
                prompts[eng.add(p, max_tokens=k)] = (p, k)
        if not eng.has_work():
            break
        got = eng.step()
        running.append(eng.num_running)
        for ev in got:
            prompts.setdefault(("out", ev.seq_id), []).append(ev.token)
    assert not eng.has_work()
    assert max(running) <= 3 and running[-1] == 0
    for sid, (p, k) in [(s, v) for s, v in prompts.items() if not isinstance(s, tuple)]:
        assert prompts[("out", sid)] == _hf_greedy(tiny.hf, p, k), (sid, len(p))


def test_stop_ids_cancel_and_finish(tiny):
    ids = _prompt(7, 6)
    ref = _hf_greedy(tiny.hf, ids, 10)
    eng = Engine(tiny.m)
    a = eng.add(ids, max_tokens=10, stop_ids={ref[3]})
    b = eng.add(_prompt(8, 5), max_tokens=50)
    c = eng.add(_prompt(9, 4), max_tokens=50)
    out = {}
    for _ in range(3):
        for ev in eng.step():
            out.setdefault(ev.seq_id, []).append(ev)
    eng.cancel(b)
    assert eng.finish(c, "stop") is None          # no keep_cache: nothing handed back
    _drain(eng, out)
    toks = [e.token for e in out[a]]
    assert toks == ref[:ref.index(ref[3]) + 1] and out[a][-1].finish_reason == "stop"
    assert len(out[b]) <= 3 and len(out[c]) <= 3  # nothing after cancel/finish
    assert eng.num_running == 0 and not eng.has_work()


def test_kept_cache_continues_the_sequence(tiny):
    """keep_cache hands back the sequence's batch-1 cache (prompt + tokens fed
    back); adding the extended prompt with it prefills only the rest and
    continues exactly as the whole sequence from scratch -- also when the row
    ran padded inside a batch (a copy of its row) and past a sliding window."""
    ids = _prompt(10, 7)
    eng = Engine(tiny.m, max_batch=2, prefill_chunk=3)
    sid = eng.add(ids, max_tokens=9, keep_cache=True)
    eng.add(_prompt(11, 13), max_tokens=12)        # a longer row: `ids` runs padded
    out = _drain(eng)
    first = [e.token for e in out[sid]]
    cache = out[sid][-1].cache
    assert first == _hf_greedy(tiny.hf, ids, 9)
    assert cache is not None and cache.offset in (len(ids) + 8, len(ids) + 9)
    seq = (ids + first)[:cache.offset] + _prompt(12, 3)
    sid2 = eng.add(seq, max_tokens=5, cache=cache)
    assert eng.stats["prefill_tokens"] > 0
    before = eng.stats["prefill_tokens"]
    again = [e.token for e in _drain(eng)[sid2]]
    assert eng.stats["prefill_tokens"] - before == len(seq) - len((ids + first)[:cache.offset])
    assert again == _hf_greedy(tiny.hf, seq, 5)


def test_prefix_caches_of_different_lengths_prefill_as_one_group(tiny):
    """Sequences that bring prefix caches of different lengths are admitted
    together (one prefill group, not one each) and continue exactly as each
    whole prompt from scratch; sequences without a cache form the next group.
    cached_tokens says how much of each cache was used: rows right-aligned,
    a row recomputes the cached positions past the group's common start (a
    sliding-window model keeps one group per cached sequence: whole caches)."""
    base = _prompt(20, 9)
    eng = Engine(tiny.m, max_batch=4, prefill_chunk=64)
    caches = []
    for n in (4, 9):      # two kept caches: base[:4] + 1 token and base + 1 token
        sid = eng.add(base[:n], max_tokens=2, keep_cache=True)
        out = _drain(eng)
        caches.append((base[:n] + [out[sid][0].token], out[sid][-1].cache))
    prompts = [caches[0][0] + _prompt(21, 6), _prompt(23, 5), caches[1][0] + _prompt(22, 2),
               caches[1][0][:7] + _prompt(24, 4)]
    with_cache = {0: caches[0][1], 2: caches[1][1]}
    tokens0 = eng.stats["prefill_tokens"]
    sids = [eng.add(p, max_tokens=6, cache=with_cache.get(i)) for i, p in enumerate(prompts)]
    out = _drain(eng)
    for sid, p in zip(sids, prompts):
        assert [e.token for e in out[sid]] == _hf_greedy(tiny.hf, p, 6)
    cached = [out[sid][0].cached_tokens for sid in sids]
    assert all(e.cached_tokens is None for sid in sids for e in out[sid][1:])
    if tiny.kind == "qwen3":
        # rows 0 and 2: 11 and 12 tokens, 5 and 10 cached, remainders 6 and 2:
        # 12 columns, the common start c = 12 - 6 = 6, row 0 padded by 1
        assert cached == [5, 0, 6, 0]
        # two groups: the cached rows (2 x 6 columns), then the rest (2 x 11)
        assert eng.stats["prefill_tokens"] - tokens0 == 2 * 6 + 2 * 11
    else:
        assert cached == [5, 0, 10, 0]
        assert eng.stats["prefill_tokens"] - tokens0 == 6 + 2 + 2 * 11


def test_logprobs_and_top_logprobs(tiny):
    ids = _prompt(13, 5)
    eng = Engine(tiny.m, max_batch=2)
    a = eng.add(ids, max_tokens=3, logprobs=True, top_logprobs=4)
    b = eng.add(_prompt(14, 9), max_tokens=3)      # a row that asks for none
    out = _drain(eng)
    seq = list(ids)
    for ev in out[a]:
        ref = _hf_logprobs(tiny.hf, seq)
        assert abs(ev.logprob - ref[ev.token]) < 1e-4
        want = np.argsort(-ref)[:4]
        assert [t for t, _ in ev.top_logprobs] == want.tolist()
        assert np.allclose([lp for _, lp in ev.top_logprobs], ref[want], atol=1e-4)
        seq.append(ev.token)
    assert all(e.logprob is None and e.top_logprobs is None for e in out[b])


def test_token_mask_constrains_every_step(tiny):
    allowed = np.zeros(VOCAB, bool)
    allowed[[3, 17, 40]] = True
    seen = []

    def mask(generated):
        seen.append(list(generated))
        return allowed

    eng = Engine(tiny.m)
    sid = eng.add(_prompt(15, 6), max_tokens=5, token_mask=mask)
    toks = [e.token for e in _drain(eng)[sid]]
    assert len(toks) == 5 and set(toks) <= {3, 17, 40}
    assert seen[:5] == [toks[:i] for i in range(5)]   # called with the tokens so far


def test_seeded_sampling_does_not_depend_on_the_batch(tiny):
    """A row's own seeded sampler draws the same tokens alone or batched."""
    def run(extra):
        eng = Engine(tiny.m, max_batch=4)
        sid = eng.add(_prompt(16, 5), sampler=Sampler(temperature=1.0, seed=3), max_tokens=8)
        for seed in range(extra):
            eng.add(_prompt(20 + seed, 3 + seed), sampler=Sampler(temperature=0.7, seed=seed),
                    max_tokens=8)
        return [e.token for e in _drain(eng)[sid]]
    assert run(0) == run(3)


def test_bad_arguments_name_what_is_wrong(tiny):
    eng = Engine(tiny.m)
    with pytest.raises(ValueError, match="prompt_ids: token id 96 is outside"):
        eng.add([1, VOCAB])
    with pytest.raises(ValueError, match="token id -1"):
        eng.add([-1])
    with pytest.raises(ValueError, match="prompt_ids is empty"):
        eng.add([])
    with pytest.raises(TypeError, match="integer token ids"):
        eng.add([1.5])
    with pytest.raises(TypeError, match="prompt_ids must be a sequence"):
        eng.add("hello")
    with pytest.raises(ValueError, match="max_tokens"):
        eng.add([1], max_tokens=0)
    with pytest.raises(ValueError, match="max_batch"):
        Engine(tiny.m, max_batch=0)
    with pytest.raises(ValueError, match="prefill_chunk"):
        Engine(tiny.m, prefill_chunk=0)
    with pytest.raises(TypeError, match="token_mask"):
        eng.add([1], token_mask=3)
    sid = eng.add([1, 2], max_tokens=1, keep_cache=True)
    cache = _drain(eng)[sid][-1].cache
    assert cache.offset == 2          # max_tokens=1: no token was fed back
    with pytest.raises(ValueError, match="at least one must be left"):
        eng.add([1, 2], cache=cache)
    cache.free()
    assert not eng.has_work()
    assert check_ids(np.array([[1, 2]], np.int64), 5, "x").tolist() == [1, 2]


def test_host_timers(tiny):
    """The decode steps' host time splits into building the graph, queueing
    it (async_eval) and waiting for the tokens, each inside the wall time."""
    import time
    eng = Engine(tiny.m)
    eng.add(_prompt(30, 9), max_tokens=12)
    t0 = time.perf_counter()
    _drain(eng)
    wall = time.perf_counter() - t0
    st = eng.stats
    assert st["decode_tokens"] == 12 and st["prefill_tokens"] == 9
    assert st["build_seconds"] > 0 and st["queue_seconds"] > 0 and st["wait_seconds"] > 0
    assert st["build_seconds"] + st["queue_seconds"] + st["wait_seconds"] <= wall
