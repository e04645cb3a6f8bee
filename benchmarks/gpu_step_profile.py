"""Where a GPU decode step's time goes, with the one-kernel step on and off.

For each model (random weights of the real shapes, bench_decode's checkpoints)
the generation engine decodes 128 tokens after a 512-token prompt; printed per
step (the first two decode steps, which wait for the prompt, left out): wall
time, the host's graph building (build), MLX's encoding and launch of it
(queue, in async_eval), the host's wait for the device (wait), and,
under torch.profiler (which records every CUDA kernel of the
process), the device time of the kernels a step launches: the one-kernel
step's kernel alone and all kernels together.

    python benchmarks/gpu_step_profile.py --models smollm2-135m,llama-3.2-1b --quant bf16

With --phases: instead, where the one-kernel step's time goes phase by phase
(MLXCY_STEP_TIMING=1: every block reads the GPU's clock at its start, at its
arrival at and release from each grid-wide barrier, at its end, and once
inside each phase: when its activations were loaded, or attention's merge
began), per kind of phase averaged over layers and steps: the phase's span
(first block released to last block arrived), the median and slowest block's
work, the barrier's latency (last arrival to the median block's release), the
median and slowest block's time to the mid reading and the slowest block's
time after it.  Layer 0's first phase (the embedding) is shown apart: in the
timed build it holds a stall of ~200 us that the production kernel does not
have (its device time, the default mode, is that much shorter than the timed
step; H100, 2026-12-05), most likely from reading the readings back every
step (an MLX array the host reads moves to unified memory).

With --timeline: instead, the CUDA kernels of 12 steady steps in device
order: per kind, the median duration and the median device-idle gap before
it, and the step's period (one step kernel's start to the next).

--split on|off|2|4|8 forces the one-token kernel's MLP split (all modes; the
default lets the kernel choose), so one tree can time the settings in turn.

With --positions 1,2,4,8: instead, one forward of M positions of one sequence
(a speculative step's verification) over the cache of a 512-token prompt, per
M: the wall time of forward + evaluation (median of --reps, the cache trimmed
back after each) with the several-positions kernel and op by op, and the
kernel's device time.
"""
from __future__ import annotations

import argparse
import collections
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_decode import random_hf_dir, variant_dir


def run(model, prompt, n, on):
    from mlxcy.generation.engine import Engine
    from mlxcy.generation.sample import Sampler
    from mlxcy.models.base import set_gpu_decode_step
    old = set_gpu_decode_step(on)
    try:
        eng = Engine(model, max_batch=1)
        eng.add(prompt, sampler=Sampler(temperature=0.0), max_tokens=n)
        # the first decode steps wait for the prompt's forward on the device:
        # leave them out, so the figures are a steady step's
        while eng.has_work() and eng.stats["decode_steps"] < 2:
            eng.step()
        first = dict(eng.stats)
        while eng.has_work():
            eng.step()
        return {k: v - first[k] for k, v in eng.stats.items()
                if isinstance(v, (int, float)) and k in first}
    finally:
        set_gpu_decode_step(old)


def device_times(fn):
    """{kernel name: [device us of each launch]} of the CUDA kernels fn() runs
    (torch.profiler records every kernel of the process)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as tprof
    with tprof(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
    times = collections.defaultdict(list)
    for ev in prof.events():
        if "CUDA" in str(getattr(ev, "device_type", "")):
            times[ev.name].append(getattr(ev, "device_time_total", 0.0))
    return times


def models(a):
    """(label, fused model, 512-token prompt) for each of --models x --quant,
    random weights of the real shapes; each model is closed after its turn."""
    from mlxcy.assets import cache_dir
    from mlxcy.models.load import load_model
    for name in a.models.split(","):
        for q in a.quant.split(","):
            m = load_model(variant_dir(random_hf_dir(name, cache_dir() / "bench"), q))
            m.fuse()
            try:
                yield f"{name} {q}", m, np.random.default_rng(0).integers(100, 30000, 512).tolist()
            finally:
                m.close()


def profile(model, prompt, n, on):
    """Median device us per step of the step kernel and of all kernels."""
    times = device_times(lambda: run(model, prompt, n, on))
    step = [t for k, v in times.items() if "decode_step" in k for t in v]
    total = sum(sum(v) for v in times.values())
    return (statistics.median(step) if step else 0.0), total


def forward_times(model, prompt, positions, reps, on):
    """{M: (median wall us of an M-position forward, median kernel us)}."""
    import torch

    from mlxcy import transforms
    from mlxcy.models.base import set_gpu_verify_step
    old = set_gpu_verify_step(on)
    cache = model.make_cache()
    out = {}
    try:
        transforms.eval(model(np.array([prompt], np.int32), cache, last_only=True))
        for m in positions:
            ids = np.array([prompt[:m]], np.int32)
            walls = []
            for i in range(reps + 2):                     # two warm-ups
                t = time.perf_counter()
                transforms.eval(model(ids, cache))
                walls.append(time.perf_counter() - t)
                cache.trim(m)
            kern = []
            if torch.cuda.is_available():          # (off a GPU: wall times only)
                def forwards():
                    for _ in range(reps):
                        transforms.eval(model(ids, cache))
                        cache.trim(m)
                kern = [t for k, v in device_times(forwards).items()
                        if "verify_step" in k or "decode_step" in k for t in v]
            out[m] = (statistics.median(walls[2:]) * 1e6,
                      statistics.median(kern) if kern else 0.0)
    finally:
        cache.free()
        set_gpu_verify_step(old)
    return out


def positions_table(a):
    positions = [int(x) for x in a.positions.split(",")]
    print("| model | positions | one kernel wall us | kernel us | ops wall us | ops / one kernel |")
    print("|---|---:|---:|---:|---:|---:|")
    for label, m, prompt in models(a):
        on, off = (forward_times(m, prompt, positions, a.reps, v) for v in (True, False))
        for p in positions:
            print(f"| {label} | {p} | {on[p][0]:.0f} | {on[p][1]:.0f} | {off[p][0]:.0f} | "
                  f"{off[p][0] / on[p][0]:.2f} |", flush=True)


def timeline(model, prompt, steps=12):
    """The CUDA kernels of `steps` steady one-token steps (after 20 steps of
    warm-up), in device order: (name, device start us, duration us), under
    torch.profiler's CUDA activity."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as tprof

    from mlxcy.generation.engine import Engine
    from mlxcy.generation.sample import Sampler
    eng = Engine(model, max_batch=1)
    eng.add(prompt, sampler=Sampler(temperature=0.0), max_tokens=20 + steps + 4)
    for _ in range(20):
        eng.step()
    with tprof(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            eng.step()
    while eng.has_work():
        eng.step()
    ks = [(ev.name, ev.time_range.start, ev.time_range.end - ev.time_range.start)
          for ev in prof.events() if "CUDA" in str(getattr(ev, "device_type", ""))]
    return sorted(ks, key=lambda k: k[1])


def timeline_table(a):
    """Per model: each kind of kernel a step launches, its median duration and
    the median gap (device idle) before it; then the step's period."""
    print("| model | kernel | launches | median us | median gap before it us |")
    print("|---|---|---:|---:|---:|")
    for label, m, prompt in models(a):
        ks = timeline(m, prompt)
        by = collections.defaultdict(lambda: ([], []))
        for (name, start, dur), prev in zip(ks[1:], ks):
            by[name[:60]][0].append(dur)
            by[name[:60]][1].append(start - (prev[1] + prev[2]))
        for name, (durs, gaps) in by.items():
            print(f"| {label} | {name} | {len(durs)} | {statistics.median(durs):.1f} | "
                  f"{statistics.median(gaps):.1f} |")
        starts = [s for n, s, _ in ks if "decode_step" in n]
        if len(starts) > 1:
            print(f"| {label} | (step period) | {len(starts) - 1} | "
                  f"{statistics.median(np.diff(starts)):.1f} | |", flush=True)


PHASES = ("A: norm, q/k/v", "B: attention", "C: o_proj + residual", "D: norm, gate/up",
          "E: down + residual")
SPLIT_PHASES = PHASES[:3] + ("D+E: norm, gate/up, down by slices",)   # (the MLP split)


def step_phases(tm):
    """Per barrier of one step's clock readings (gpu_step_timing's rows):
    (span, median block work, slowest block work, barrier, median and
    slowest block's time to the phase's mid reading, slowest block's time
    after it) in us, the head's (span, median, slowest, 0, 0, 0, 0), and the
    step's total."""
    t = ((tm.astype(np.int64) - int(tm[0].min())) % (1 << 32)) / 1e3
    nb = (t.shape[0] - 2) // 3
    rows, prev = [], t[0]
    for p in range(nb):
        arr, rel, mid = t[1 + 2 * p], t[2 + 2 * p], t[2 + 2 * nb + p]
        work, to_mid = arr - prev, mid - prev
        rows.append((arr.max() - prev.min(), np.median(work), work.max(),
                     np.median(rel) - arr.max(), np.median(to_mid), to_mid.max(),
                     (arr - mid).max()))
        prev = rel
    end = t[1 + 2 * nb]
    work = end - prev
    head = (end.max() - prev.min(), np.median(work), work.max(), 0.0, 0.0, 0.0, 0.0)
    return rows, head, end.max() - t[0].min()


def phases_table(a):
    from mlxcy.generation.engine import Engine
    from mlxcy.generation.sample import Sampler
    from mlxcy.models.base import gpu_decode_steps, gpu_step_timing
    print("| model | phase | per step | span us | median block us | slowest block us | "
          "barrier us | to mid: median / slowest us | after mid: slowest us | us per step |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for label, m, prompt in models(a):
        eng = Engine(m, max_batch=1)
        eng.add(prompt, sampler=Sampler(temperature=0.0), max_tokens=a.gen)
        steps, heads, totals = [], [], []
        seen = gpu_decode_steps()
        while eng.has_work():
            eng.step()
            ran, seen = gpu_decode_steps() - seen, gpu_decode_steps()
            tm = gpu_step_timing(m)
            if tm is not None and ran and eng.stats["decode_steps"] > 8:   # past the warm-up
                rows, head, total = step_phases(tm)
                steps.append(rows)
                heads.append(head)
                totals.append(total)
        if not steps:
            print(f"| {label} | (the one-kernel step did not run) | | | | | | | | |")
            continue
        r = np.array(steps)                    # [step, barrier, 7]
        n = m.config.num_hidden_layers
        names = PHASES if r.shape[1] == 5 * n else SPLIT_PHASES
        per = r.reshape(r.shape[0], n, len(names), r.shape[2])   # [step, layer, phase, 7]
        kinds = [(names[0] + ", layer 0 (embedding)", 1, per[:, 0, 0].mean(axis=0)),
                 (names[0] + ", layers 1+", n - 1, per[:, 1:, 0].mean(axis=(0, 1)))]
        kinds += [(name, n, per[:, :, i].mean(axis=(0, 1))) for i, name in enumerate(names) if i]
        for name, count, (span, med, slow, bar, mid_med, mid_slow, after) in kinds:
            print(f"| {label} | {name} | {count} | {span:.2f} | {med:.2f} | {slow:.2f} | {bar:.2f} | "
                  f"{mid_med:.2f} / {mid_slow:.2f} | {after:.2f} | {count * (span + bar):.0f} |")
        span, med, slow = np.mean(heads, axis=0)[:3]
        print(f"| {label} | final norm + head | 1 | {span:.2f} | {med:.2f} | {slow:.2f} | | | | "
              f"{span:.0f} |")
        print(f"| {label} | whole step ({len(totals)} steps) | | | | | | | | "
              f"{np.median(totals):.0f} |", flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="smollm2-135m,llama-3.2-1b")
    ap.add_argument("--quant", default="bf16")
    ap.add_argument("--gen", type=int, default=128)
    ap.add_argument("--positions", default="",
                    help="comma-separated M: time forwards of M positions instead")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--phases", action="store_true",
                    help="the one-kernel step's time per phase (MLXCY_STEP_TIMING)")
    ap.add_argument("--timeline", action="store_true",
                    help="the kernels of 12 steady steps: durations and device idle gaps")
    ap.add_argument("--split", default="auto", choices=("auto", "on", "off", "2", "4", "8"),
                    help="the one-token kernel's MLP split (base.set_gpu_step_split): the "
                         "kernel's choice, wherever the slices are whole, never, or slices of "
                         "2, 4 or 8 chunks of each down row wherever whole")
    ap.add_argument("--kernel-only", action="store_true",
                    help="leave out the op path's rows (A/B runs of kernel versions)")
    a = ap.parse_args()
    from mlxcy.models.base import set_gpu_step_split
    modes = {"auto": None, "on": True, "off": False}
    set_gpu_step_split(modes[a.split] if a.split in modes else int(a.split))
    if a.phases:
        os.environ["MLXCY_STEP_TIMING"] = "1"       # read at the first step
        return phases_table(a)
    if a.positions:
        return positions_table(a)
    if a.timeline:
        return timeline_table(a)

    print("| model | step | tok/s | build us/step | queue us/step | wait us/step | kernel us | "
          "all kernels us/step |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for label, m, prompt in models(a):
        for on in (True,) if a.kernel_only else (True, False):
            run(m, prompt, a.gen, on)   # warm-up as long: the KV cache grows in it too
            st = run(m, prompt, a.gen, on)
            steps = max(st["decode_steps"], 1)
            kern, total = profile(m, prompt, a.gen, on)
            print(f"| {label} | {'one kernel' if on else 'ops'} | "
                  f"{st['decode_tokens'] / st['decode_seconds']:.1f} | "
                  f"{st['build_seconds'] / steps * 1e6:.0f} | "
                  f"{st['queue_seconds'] / steps * 1e6:.0f} | "
                  f"{st['wait_seconds'] / steps * 1e6:.0f} | {kern:.0f} | "
                  f"{total / (a.gen + 1):.0f} |", flush=True)


if __name__ == "__main__":
    main()
