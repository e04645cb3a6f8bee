"""Speculative decoding by prompt lookup vs plain decoding (same engine, same
model, greedy): decode tok/s of each, their ratio, and whether the tokens are
identical.  Copy-heavy prompts (a code edit with Qwen2.5-Coder-0.5B, a
summary that quotes with SmolLM2-135M) and prompts that copy nothing.

    python benchmarks/bench_speculative.py [--max-tokens 128] [--repeats 2] [--k K]
        [--models qwen,smol] [--gpu-verify on|off] [--chain on|off] [--adapt auto|on|off]
        [--path qwen=DIR]
        [--dtype bfloat16]
        [--forward-cost [--context 150,2000]] [--step-times] [--bound]
        [--models qwen15 --draft qwen15=qwen --num-draft 2,4]

--chain sets tuning's lookup_chain (a single greedy sequence's verification
queued before the one before it is read; off by default); --adapt sets
tuning's lookup_adapt (on: proposal lengths follow the acceptances; off: every
proposal as long as the lookup gives; auto, the default: off where the GPU
kernel verifies).
--host-bound prints, instead, plain decoding against prompt lookup with
chaining off and on for a random-weight model so small (Qwen3 shape, hidden
64, 2 layers, 512 tokens) that a step costs mostly host time, as it does on a
GPU: its greedy output repeats ids, so lookup proposes and verifies.

--forward-cost prints, instead, what a verification costs: the wall time of
one forward of m = 1 .. 17 positions after a context of --context tokens (150;
a list runs each), medians of 15 with each m after the other in turn, and its
ratio to one position's.

--bound prints, instead, for each greedy case the most any choice of proposal
lengths could give lookup with this device's costs: an oracle that knows how
many proposals will be kept verifies exactly those where that costs less than
plain steps (plain steps at plain decoding's rate, verifications at
--forward-cost's).

--step-times prints, instead, where prompt lookup's time goes on the quoting
summary (SmolLM2): for plain decoding and for lookup, tok/s over the decode
steps, and the median wall time of a verification step (split into the read
of the token before it, its synchronous evaluation and the host's work) and
of a plain step (best of 3 runs).

Draft models (--draft TARGET=DRAFT, each a model name or a path; --num-draft
a list of draft lengths): the target's cases decoded plainly and with the
draft proposing, as the lookup rows are.  A speedup measured with a
random-weight pair says nothing (acceptance is chance); the registry's real
pair is Qwen2.5-Coder-1.5B (qwen15, 1.1 GB: `--models qwen15` runs its lookup
rows) with Qwen2.5-Coder-0.5B drafting: `--draft qwen15=qwen`."""
import argparse
import time

import mlxcy
from mlxcy.assets import qwen25_15b_gguf, qwen25_gguf, smollm2_gguf

CODE = '''def parse_config(path):
    with open(path) as f:
        lines = f.read().splitlines()
    out = {}
    for line in lines:
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, value = line.split("=", 1)
        out[key.strip()] = value.strip()
    return out


def load_all(paths):
    configs = []
    for p in paths:
        configs.append(parse_config(p))
    return configs
'''

# The code edit is asked of an editor that replies with the edited file only
# (asked as a question, the 0.5B model explains for ~70 tokens before it
# copies: that measures prose, not copying).
EDITOR = ("You are a code editor. Reply with the complete edited file in one code block "
          "and nothing else.")
CASES = [
    ("qwen", "code edit (copies)",
     [{"role": "system", "content": EDITOR},
      {"role": "user", "content": "Rename the function parse_config to read_config everywhere "
                                  "in this file:\n\n```python\n" + CODE + "```"}], True),
    ("smol", "quoting summary (copies)",
     "Summarize the report, quoting it.\n\nReport: The bridge on Route 9 will close for repairs "
     "from March 3 to March 17. Drivers should use the detour through Elm Street and Oak "
     "Avenue. Buses 12 and 14 will stop at the temporary station near the library. The city "
     "expects the repairs to cost 2.4 million dollars.\n\nQuote the report's sentences "
     "word for word.", True),
    ("qwen", "no copying", "Write a short poem about autumn leaves.", True),
    ("smol", "no copying", "Write a short poem about autumn leaves.", True),
]
# Greedy small models repeat their own lines, so lookup finds matches even in a
# poem; sampled at temperature 1 they rarely repeat a run of tokens, which is
# the case that copies nothing (lookup must then cost ~nothing).  The sampled
# streams of the two modes differ, so "identical" does not apply.
SAMPLED = {"temperature": 1.0, "seed": 7}
CASES += [
    ("qwen", "no copying, sampled T=1", "Write a short story about a lighthouse keeper.", True),
    ("smol", "no copying, sampled T=1", "Write a short story about a lighthouse keeper.", True),
]
MODELS = {"qwen": qwen25_gguf, "smol": smollm2_gguf, "qwen15": qwen25_15b_gguf}
FAMILY = {"qwen15": "qwen"}          # a model that runs another's cases


def cases_of(name):
    return [c for c in CASES if c[0] == FAMILY.get(name, name)]


def messages(prompt):
    return prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]


def prompt_ids(tm, prompt, chat):
    """The ids the engine starts a case from (its lookup history's prompt)."""
    text = tm.apply_chat_template(messages(prompt)) if chat else prompt
    return tm.tokenizer.encode(text, add_special_tokens=False)


def model_path(name, paths):
    """A --models name's file (--path NAME=PATH overrides it), or a path as given."""
    return paths.get(name) or (str(MODELS[name]()) if name in MODELS else name)


def run(tm, prompt, chat, max_tokens, **opts):
    it = tm.stream_chat(messages(prompt), max_tokens=max_tokens, **opts) if chat else \
        tm.stream(prompt, max_tokens=max_tokens, **opts)
    ids = [t.id for t in it]
    return ids, tm.metrics()


def batched(tm, a):
    """The SmolLM2 greedy prompts (quoting summary, poem) as one batch through
    batch_generate: each row accepts its own number of tokens per step."""
    texts = [tm.apply_chat_template([{"role": "user", "content": p}])
             for name, what, p, _ in CASES if name == "smol" and "sampled" not in what]
    tm.batch_generate(texts, max_tokens=8)                      # warm-up
    best = {}
    for _ in range(a.repeats):
        for mode, opts in (("plain", {}), ("lookup", {"prompt_lookup": a.k})):
            r = tm.batch_generate(texts, max_tokens=a.max_tokens, **opts)
            if mode not in best or (r.metrics.decode_tokens_per_second
                                    > best[mode].metrics.decode_tokens_per_second):
                best[mode] = r
    p, lk = best["plain"], best["lookup"]
    print(f"{'smol':6} {'batch of %d (batch_generate)' % len(texts):26} "
          f"{p.metrics.decode_tokens_per_second:11.1f} "
          f"{lk.metrics.decode_tokens_per_second:12.1f} "
          f"{lk.metrics.decode_tokens_per_second / p.metrics.decode_tokens_per_second:6.2f} "
          f"{lk.metrics.acceptance_rate:6.0%} {lk.metrics.tokens_per_step:8.2f} "
          f"{p.token_ids == lk.token_ids} ({sum(map(len, p.token_ids))} tokens)", flush=True)


def forward_cost(tm, name, context, reps=15, ms=(1, 2, 3, 4, 5, 6, 9, 13, 17)):
    """Milliseconds of one forward of m positions over a cache of `context`
    positions (medians, printed and returned by m)."""
    import statistics
    import numpy as np
    from mlxcy.transforms import eval as mxeval
    model = tm.model
    cache = model.make_cache()
    rng = np.random.default_rng(0)
    for i in range(0, context, 512):
        ids = rng.integers(100, 5000, size=(1, min(512, context - i))).astype(np.int32)
        mxeval(model(mlxcy.array(ids), cache, last_only=True))
    t = {m: [] for m in ms}
    for _ in range(reps):
        for m in ms:
            ids = mlxcy.array(rng.integers(100, 5000, size=(1, m)).astype(np.int32))
            t0 = time.perf_counter()
            mxeval(model(ids, cache))
            t[m].append((time.perf_counter() - t0) * 1e3)
            cache.trim(m)
    med = {m: statistics.median(t[m]) for m in ms}
    print(f"{name}, context {context}: " + ", ".join(f"{m}: {med[m]:.1f} ms "
                                                     f"({med[m] / med[1]:.2f}x)" for m in ms))
    return med


def bound(tm, name, case, a):
    """The most any choice of proposal lengths could give prompt lookup on a
    greedy case here: an oracle that knows how many of the lookup's
    proposals plain decoding will agree with verifies exactly those, where
    that costs less than the plain steps it replaces.  Plain steps cost
    what plain decoding's did; a verification of m positions a synchronous
    forward of m (forward_cost, interpolated)."""
    import numpy as np
    from mlxcy.generation.engine import DEFAULT_LOOKUP, lookup_proposals
    _, what, prompt, chat = case
    run(tm, prompt, chat, 8)                    # warm-up
    gen, m = max((run(tm, prompt, chat, a.max_tokens) for _ in range(a.repeats)),
                 key=lambda r: r[1].decode_tokens_per_second)
    step = 1e3 / m.decode_tokens_per_second
    cost = forward_cost(tm, name, 150, ms=(1, 2, 3, 4, 6, 9, 13, DEFAULT_LOOKUP + 1))
    ks = sorted(cost)
    hist = prompt_ids(tm, prompt, chat) + gen[:1]
    j, total = 0, 0.0
    while j < len(gen) - 1:
        props, _ = lookup_proposals(hist, min(DEFAULT_LOOKUP, len(gen) - 1 - j))
        k = 0
        while k < len(props) and props[k] == gen[j + 1 + k]:
            k += 1
        verify = float(np.interp(k + 1, ks, [cost[x] for x in ks]))
        n = k + 1 if k and verify < (k + 1) * step else 1
        total += verify if n > 1 else step
        hist += gen[j + 1:j + 1 + n]
        j += n
    print(f"{name:6} {what:26} plain {step:.2f} ms a token: lookup's bound "
          f"{(len(gen) - 1) * step / total:.2f}x", flush=True)


def step_times(tm, max_tokens, k, runs=3):
    """Per engine step of the quoting summary: its wall time, whether it
    verified proposals, and of its wall time the wait for the device to hand
    back the token before it (read), the verification's synchronous
    evaluation (eval: encoding, running and reading its kernels) and the
    rest, on the host (Engine.stats' wait_seconds, verify_eval_seconds)."""
    import statistics
    from mlxcy.generation.engine import Engine
    name, what, prompt, chat = next(c for c in CASES if c[0] == "smol")
    ids = prompt_ids(tm, prompt, chat)
    print(f"{'mode':6} {'tok/s':>7} {'steps':>6} | verify: {'n':>3} {'wall':>6} {'read':>6} "
          f"{'eval':>6} {'host':>6} | plain: {'n':>3} {'wall':>6} {'read':>6}   (ms, medians)")
    for mode, lookup in (("plain", None), ("lookup", k)):
        best = None
        for _ in range(runs):
            eng = Engine(tm.model, max_batch=1)
            eng.add(ids, max_tokens=max_tokens, prompt_lookup=lookup,
                    stop_ids=set(tm.tokenizer.eos_ids))
            steps, prev = [], dict(eng.stats)
            while eng.has_work():
                t0 = time.perf_counter()
                n = len(eng.step())
                wall = time.perf_counter() - t0
                st = dict(eng.stats)
                if st["prefill_tokens"] == prev["prefill_tokens"]:      # a decode step
                    ev = st["verify_eval_seconds"] - prev["verify_eval_seconds"]
                    steps.append(dict(wall=wall, read=st["wait_seconds"] - prev["wait_seconds"] - ev,
                                      eval=ev, verify=st["spec_steps"] > prev["spec_steps"], n=n))
                prev = st
            eng.close()
            steps = steps[1:]                           # (the first reads the prompt's token)
            rate = sum(s["n"] for s in steps) / sum(s["wall"] for s in steps)
            if best is None or rate > best[0]:
                best = (rate, steps)
        rate, steps = best

        def med(sel, key):
            return f"{statistics.median(s[key] for s in sel) * 1e3:6.3f}" if sel else f"{'-':>6}"
        v = [s for s in steps if s["verify"]]
        p = [s for s in steps if not s["verify"]]
        for s in v:
            s["host"] = s["wall"] - s["read"] - s["eval"]
        print(f"{mode:6} {rate:7.0f} {len(steps):6} | verify: {len(v):3} {med(v, 'wall')} "
              f"{med(v, 'read')} {med(v, 'eval')} {med(v, 'host')} | plain: {len(p):3} "
              f"{med(p, 'wall')} {med(p, 'read')}")


def host_bound(reps=7, n=200):
    """tok/s (medians of reps, the modes taking turns) of plain decoding and
    of prompt lookup with chaining off and on, on a model whose steps are
    mostly host time; and whether the tokens are identical."""
    import statistics
    import tempfile
    from pathlib import Path
    import numpy as np
    import bench_batch
    from mlxcy.generation.engine import Engine
    from mlxcy.models.load import load_model
    bench_batch.SHAPES["host-bound"] = dict(bench_batch.SHAPES["tiny"], vocab_size=512)
    with tempfile.TemporaryDirectory() as tmp:
        model = load_model(bench_batch.make_model_dir("host-bound", Path(tmp) / "m", "float32"))
        prompt = np.random.default_rng(1).integers(0, 512, 24).tolist() * 4
        modes = {"plain": (None, False), "lookup, chain off": (8, False),
                 "lookup, chain on": (8, True)}
        rate, toks, used = {m: [] for m in modes}, {}, {}
        for _ in range(reps):
            for mode, (k, chain) in modes.items():
                with mlxcy.tuning.override(lookup_chain=chain):
                    eng = Engine(model, max_batch=1)
                    eng.add(prompt, max_tokens=n, prompt_lookup=k)
                    out = [ev.token for _ in range(10 * n) if eng.has_work() for ev in eng.step()]
                    st = dict(eng.stats)
                    eng.close()
                rate[mode].append(st["decode_tokens"] / st["decode_seconds"])
                toks[mode] = out
                used[mode] = (st["tokens_per_step"], st["chained_used"], st["chained_steps"])
        model.close()
    base = statistics.median(rate["plain"])
    print(f"{'mode':18} {'tok/s':>8} {'ratio':>6} {'tok/step':>8} {'chained used/queued':>20} identical")
    for mode in modes:
        r = statistics.median(rate[mode])
        tps, u, q = used[mode]
        print(f"{mode:18} {r:8.0f} {r / base:6.2f} {tps:8.2f} {f'{u}/{q}':>20} "
              f"{toks[mode] == toks['plain']}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--k", type=int, default=None,
                    help="most tokens proposed per step (default: the engine's, DEFAULT_LOOKUP)")
    ap.add_argument("--draft", action="append", default=[], metavar="TARGET=DRAFT",
                    help="a target and its draft model, each a name of --models or a path")
    ap.add_argument("--num-draft", default="4", help="draft lengths to run (a list)")
    ap.add_argument("--models", default="qwen,smol",
                    help="which of the cases' models to run (qwen: Qwen2.5-Coder-0.5B, "
                         "smol: SmolLM2-135M, qwen15: Qwen2.5-Coder-1.5B, a 1.1 GB "
                         "download, so not by default)")
    ap.add_argument("--path", action="append", default=[], metavar="NAME=PATH",
                    help="load a case's model from PATH instead of its GGUF (e.g. qwen=DIR, "
                         "a 4-bit conversion the GPU kernel runs: mlxcy convert --bits 4)")
    ap.add_argument("--gpu-verify", choices=("on", "off"), default="on",
                    help="on a GPU, verification steps as one kernel (on) or op by op (off)")
    ap.add_argument("--chain", choices=("on", "off"), default="off",
                    help="tuning's lookup_chain")
    ap.add_argument("--adapt", choices=("auto", "on", "off"), default="auto",
                    help="tuning's lookup_adapt")
    ap.add_argument("--dtype", choices=("float32", "bfloat16", "float16"),
                    help="the models' activations (default: the loader's, float32 for a GGUF; "
                         "on a GPU, bfloat16 verification steps run their products on the "
                         "tensor cores)")
    ap.add_argument("--host-bound", action="store_true",
                    help="plain vs lookup with chaining off/on on a host-bound tiny model")
    ap.add_argument("--forward-cost", action="store_true",
                    help="print a forward's wall time by its number of positions instead")
    ap.add_argument("--bound", action="store_true",
                    help="print, instead, the most any proposal lengths could give lookup on "
                         "the greedy cases with this device's verification costs")
    ap.add_argument("--context", default="150",
                    help="--forward-cost: the cache's positions before the forward (a list)")
    ap.add_argument("--step-times", action="store_true",
                    help="print the quoting summary's step times (verifications, plain steps)")
    a = ap.parse_args()
    if a.k is None:
        a.k = True                # the engine's default length
    from mlxcy.models.base import set_gpu_verify_step
    set_gpu_verify_step(a.gpu_verify == "on")
    mlxcy.tuning.set(lookup_chain=a.chain == "on",
                     lookup_adapt={"auto": None, "on": True, "off": False}[a.adapt])
    if a.host_bound:
        return host_bound()
    if a.step_times:
        tm = mlxcy.load(smollm2_gguf(), dtype=a.dtype)
        step_times(tm, a.max_tokens, a.k)
        tm.close()
        return
    wanted = [m for m in a.models.split(",") if m]
    if any(m not in MODELS for m in wanted):
        ap.error(f"--models: expected names among {', '.join(MODELS)}, got {a.models!r}")
    paths = dict(p.split("=", 1) for p in a.path)
    models = {name: model_path(name, paths) for name in wanted}
    if a.bound:
        for name, path in models.items():
            tm = mlxcy.load(path, dtype=a.dtype)
            for case in cases_of(name):
                if "sampled" not in case[1]:
                    bound(tm, name, case, a)
            tm.close()
        return
    if a.forward_cost:
        for name, path in models.items():
            tm = mlxcy.load(path, dtype=a.dtype)
            for context in (int(c) for c in a.context.split(",")):
                forward_cost(tm, name, context)
            tm.close()
        return
    print(f"{'model':6} {'prompt':26} {'plain tok/s':>11} {'lookup tok/s':>12} {'ratio':>6} "
          f"{'accept':>6} {'tok/step':>8} identical")
    for name, path in models.items():
        tm = mlxcy.load(path, dtype=a.dtype)
        for case in cases_of(name):
            compare((tm, {}), (tm, {"prompt_lookup": a.k}), name, case, a)
        if name == "smol":
            batched(tm, a)
        tm.close()
    if not a.draft:
        print("draft model: no target/draft pair given (--draft TARGET=DRAFT); none run")
    for spec in a.draft:
        name, draft_name = spec.split("=", 1)
        target, draft = model_path(name, paths), model_path(draft_name, paths)
        plain = mlxcy.load(target, dtype=a.dtype)
        for k in (int(v) for v in a.num_draft.split(",")):
            print(f"draft {spec}, {k} tokens a step (in the lookup columns):", flush=True)
            tm = mlxcy.load(target, draft_model=draft, num_draft=k, dtype=a.dtype)
            for case in cases_of(name) if name in MODELS else CASES[:1]:
                compare((plain, {}), (tm, {}), name, case, a)
            tm.close()
        plain.close()


def compare(base, spec, name, case, a):
    """One row: the case decoded by base and by spec, each a loaded model and
    generation options (plain decoding, and prompt lookup or a model with a
    draft); best of a.repeats each, taking turns."""
    _, what, prompt, chat = case
    sampling = SAMPLED if "sampled" in what else {}
    for tm, o in (base, spec):
        run(tm, prompt, chat, 8, **o)               # warm-up
    best = {}
    for _ in range(a.repeats):
        for mode, (tm, o) in (("plain", base), ("spec", spec)):
            ids, m = run(tm, prompt, chat, a.max_tokens, **o, **sampling)
            if mode not in best or m.decode_tokens_per_second > best[mode][1].decode_tokens_per_second:
                best[mode] = (ids, m)
    (pi, pm), (si, sm) = best["plain"], best["spec"]
    print(f"{name:6} {what:26} {pm.decode_tokens_per_second:11.1f} "
          f"{sm.decode_tokens_per_second:12.1f} "
          f"{sm.decode_tokens_per_second / pm.decode_tokens_per_second:6.2f} "
          f"{sm.acceptance_rate:6.0%} {sm.tokens_per_step:8.2f} "
          f"{'n/a' if sampling else pi == si} ({len(pi)} tokens)", flush=True)


if __name__ == "__main__":
    t0 = time.time()
    main()
    print(f"({time.time() - t0:.0f} s)")
