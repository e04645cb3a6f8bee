"""Run the one-token GPU kernel's device code (include/mlxcy/gpu_step.h) on
the CPU, for a tiny float32 model, and compare its logits with the op path's.

    python tools/emulate_gpu_step.py [--kind gemma3_text|llama|qwen2|qwen3]
                                     [--prompt 40] [--steps 20] [--window 48] [--split [2|4|8]]
                                     [--dtype float32|bfloat16] [--bits 4|8] [--positions 1]
                                     [--head-dim 16] [--rows 6]

For sessions without a GPU: the device source is compiled by g++ with CUDA's
built-ins written as C++ (tools/emulate_gpu_step.h), one block of THREADS threads
as OS threads (so shared memory is a function's statics, and the grid-wide
barrier meets one block); what it checks is the kernel's logic -- indices,
buffers, formulas, the cache slots it writes and reads -- not what only many
blocks or the hardware show (races between blocks, memory ordering, speed).
The scratch starts as NaN each step, so a read of what no phase wrote shows.
The model is a tiny random-weight checkpoint (tests/tiny_models.py) in float32
or bfloat16 or MLX's 4/8-bit layout (the kernel's float32 / bfloat16 paths;
the op path rounds the same values, so bfloat16 agrees to ~1e-2); steps feed
the op path's greedy tokens; the caches' capacities must not change during
the run (a KVCache's 256 + padding; a ring sized by the prompt: --prompt 40
with --window 48 leaves it growing for 8 steps, then full).  --rows B: a
batch of B left-padded prompts (row b's 3b tokens shorter), one token a row
a step (verify_step's ROWS form)."""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

# The device code's inline PTX, written as C++ (each must match once).
PATCHES = [
    (r'asm volatile("ld.acquire.gpu.global.u64 %0, [%1];" : "=l"(v) : "l"(p) : "memory");',
     "v = emu_load_acquire(p);"),
    (r'asm volatile("red.release.gpu.global.add.u64 [%0], 1;" : : "l"(b.count) : "memory");',
     "emu_add_release(b.count);"),
    (r'asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));', "t = 0;"),
] + [(f'asm("mma.sync.aligned.m16n8k16.row.col.f32.{ty}.{ty}.f32 {{%0,%1,%2,%3}}, '
      '{%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};" : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), '
      '"+f"(d[3]) : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));',
      "emu_mma(d, a, b);") for ty in ("bf16", "f16")]
PREFETCH = re.compile(r'asm volatile\("prefetch\.global\.L2 \[%0\];" : : "l"\([^;]*\)\);')


def device_source() -> str:
    text = (ROOT / "include" / "mlxcy" / "gpu_step.h").read_text()
    src = text.split('R"CUDA(', 1)[1].split(')CUDA"', 1)[0]
    for old, new in PATCHES:
        if src.count(old) != 1:
            raise SystemExit(f"emulate_gpu_step: gpu_step.h changed: {old!r} not found once")
        src = src.replace(old, new)
    src, n = PREFETCH.subn(";", src)
    if n == 0:
        raise SystemExit("emulate_gpu_step: gpu_step.h changed: no L2 prefetch found")
    src = src.replace("extern __shared__ __align__(16) unsigned char dyn_smem[];",
                      "alignas(16) static unsigned char dyn_smem[1 << 20];")   # (verify_step)
    return src.replace("__shared__ __align__(16)", "alignas(16) static") \
              .replace("__shared__", "static")


MAIN = r"""
int main(int argc, char** argv) {
  // in.bin: see _write_inputs
  std::FILE* f = std::fopen(argv[1], "rb");
  auto rd = [&](void* p, size_t n) { if (std::fread(p, 1, n, f) != n) std::abort(); };
  long long h[5];
  rd(h, sizeof h);
  const long long ne = h[0], steps = h[1], L = h[2], pos0 = h[3], maxcap = h[4];
  std::vector<long long> ent(2 * ne), caps(L), off(3 + 2 * L), sizes(3);
  rd(ent.data(), 16 * ne);
  rd(caps.data(), 8 * L);
  rd(off.data(), 8 * off.size());
  rd(sizes.data(), 24);
  const long long nscratch = sizes[0], nv = sizes[1], bs = sizes[2];
  char* blob = static_cast<char*>(std::aligned_alloc(64, (bs + 63) / 64 * 64));
  rd(blob, bs);
  std::fclose(f);
  std::vector<unsigned long long> table(ne);
  for (long long i = 0; i < ne; ++i)
    table[i] = ent[2 * i] ? reinterpret_cast<unsigned long long>(blob + ent[2 * i + 1])
                          : static_cast<unsigned long long>(ent[2 * i + 1]);
  const float* inv_freq = reinterpret_cast<const float*>(blob + off[0]);
  const int* toks = reinterpret_cast<const int*>(blob + off[1]);
  const int* rpos = reinterpret_cast<const int*>(blob + off[2]);   // (ROWS) [steps][B]
  T* kc[NL];
  T* vc[NL];
  for (int l = 0; l < NL; ++l) {
    kc[l] = reinterpret_cast<T*>(blob + off[3 + 2 * l]);
    vc[l] = reinterpret_cast<T*>(blob + off[4 + 2 * l]);
  }
  std::vector<unsigned> bar(2048, 0u);
  std::vector<float> scratch(nscratch), row(M * nv);
  std::vector<T> logits(M * nv);
  std::FILE* out = std::fopen(argv[2], "wb");
  for (long long s = 0; s < steps; ++s) {
    std::fill(scratch.begin(), scratch.end(), std::nanf(""));
    unsigned meta[4] = {0, 0, unsigned(ROWS ? pos0 + s : pos0 + s * M), unsigned(maxcap)};
    std::vector<std::thread> th;
    for (int t = 0; t < mlxcy_step::THREADS; ++t)
      th.emplace_back([&, t] {
        threadIdx.x = t;
        if constexpr (M == 1 && !ROWS)
          mlxcy_step::decode_step<T, BITS, GS, EBITS, EGS, D, NQ, NKV, HD, FF, V, NL, QKV_BIAS,
                                  QK_NORM, SLICE, GEMMA>(
              toks + s, reinterpret_cast<const int*>(meta), table.data(), inv_freq, kc, vc,
              EPS, QK_EPS, SCALE, ESCALE, scratch.data(), logits.data(), bar.data(), nullptr);
        else
          mlxcy_step::verify_step<T, BITS, GS, EBITS, EGS, D, NQ, NKV, HD, FF, V, NL, QKV_BIAS,
                                  QK_NORM, M, ROWS, GEMMA>(
              toks + s * M, reinterpret_cast<const int*>(meta), table.data(), inv_freq, kc, vc,
              EPS, QK_EPS, SCALE, scratch.data(), logits.data(), bar.data(), rpos + s * M,
              ESCALE);
      });
    for (auto& t : th) t.join();
    for (long long i = 0; i < M * nv; ++i) row[i] = static_cast<float>(logits[i]);
    std::fwrite(row.data(), 4, M * nv, out);
  }
  std::fclose(out);
  return 0;
}
"""


def build(cfg: dict, work: Path) -> Path:
    consts = "".join(f"constexpr {'bool' if isinstance(v, bool) else 'int'} {k} = "
                     f"{str(v).lower() if isinstance(v, bool) else v};\n"
                     for k, v in cfg["ints"].items())
    consts += "".join(f"constexpr float {k} = {v!r}f;\n" for k, v in cfg["floats"].items())
    src = device_source()
    threads = re.search(r"constexpr int THREADS = (\d+);", src)   # the block's size
    if threads is None:
        raise SystemExit("emulate_gpu_step: gpu_step.h changed: no `constexpr int THREADS = N;`")
    cpp = work / "emulated_step.cpp"
    cpp.write_text('#include "emulate_gpu_step.h"\n' + src + consts +
                   f"using T = {cfg['type']};\n" + MAIN)
    exe = work / "emulated_step"
    r = subprocess.run([os.environ.get("CXX", "g++"), "-std=c++20", "-O1", "-pthread", "-w",
                        f"-DEMU_THREADS={threads.group(1)}", f"-I{ROOT / 'tools'}", str(cpp), "-o",
                        str(exe)],
                       capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(f"emulate_gpu_step: g++ failed:\n{r.stderr[-4000:]}")
    return exe


def _checkpoint(kind: str, window: int, work: Path, head_dim: int = 0, hidden: int = 0) -> Path:
    import torch
    from tiny_models import make_tiny
    d = work / kind
    config = {"head_dim": head_dim} if head_dim else {}
    if hidden:
        config.update(hidden_size=hidden, intermediate_size=3 * hidden)
    hf = make_tiny(kind, d, config=config or None)
    with torch.no_grad():                # wide logits: no greedy near-ties
        hf.model.embed_tokens.weight.mul_(8.0)
    if kind == "gemma3_text":
        hf.config.sliding_window = window
    hf.save_pretrained(d, safe_serialization=True)
    return d


TYPES = {"float32": "float", "bfloat16": "emu_bf16"}


def run(kind="gemma3_text", prompt=40, steps=20, window=48, split=0, seed=0,
        dtype=None, bits=0, positions=1, head_dim=0, rows=1, hidden=0):
    """(max relative error of the emulated logits against the op path's, the
    two paths' greedy ids equal); split: 0, or the MLP split over slices of
    that many 16-byte chunks of each down row (2, 4, 8); bits 4 or 8: the checkpoint in MLX's affine
    layout (group 64, bfloat16 scales); positions > 1: steps of that many
    random tokens each (verify_step, a speculative step's form), all their
    logits compared; head_dim: the tiny model's (16) replaced; hidden: its
    hidden size (64; the MLP's 3x): above the kernel's 256 threads, a thread
    takes several rows; rows > 1: a batch of left-padded prompts, one token a
    row a step.  dtype: the activations' (None: the checkpoint's, float32, or
    bfloat16 with bits; float32 with bits: a GGUF's layout on a GPU)."""
    from mlxcy.models.load import load_model
    if split not in (0, 2, 4, 8) or isinstance(split, bool):
        raise ValueError(f"split must be 0, 2, 4 or 8, not {split!r}")
    with tempfile.TemporaryDirectory(prefix="emulate-step-") as tmp:
        work = Path(tmp)
        path = _checkpoint(kind, window, work, head_dim, hidden)
        if bits:
            from mlxcy.models.convert import convert_hf_to_mlx
            path = convert_hf_to_mlx(path, work / f"{kind}{bits}", bits=bits, group_size=64,
                                     dtype="bfloat16")
        m = load_model(path, dtype=dtype)
        try:     # (the plan's arrays are the model's: closing it frees them)
            if rows > 1:
                toks, want, plan, rpos = _reference_rows(m, prompt, steps, rows, seed)
                got = _emulate(plan, toks, rows, split, work, rows, rpos)
            else:
                toks, want, plan = _reference(m, prompt, steps, positions, seed)
                got = _emulate(plan, toks, positions, split, work)
        finally:
            m.close()
    err = float(max(np.linalg.norm(g - w) / np.linalg.norm(w) for g, w in zip(got, want)))
    return err, bool((got.argmax(-1) == want.argmax(-1)).all())


def _reference(m, prompt, steps, positions, seed):
    """The op path's steps after a random prompt: the tokens fed, every
    position's logits, and the kernel's plan for a cache after the prompt."""
    import mlxcy as mx
    from mlxcy.models import base
    from tiny_models import VOCAB
    ids = np.random.default_rng(seed).integers(0, VOCAB, prompt).tolist()
    rng = np.random.default_rng(seed + 1)
    old = base.set_gpu_decode_step(False)
    try:
        cache = m.make_cache()
        lg = m(np.array([ids], np.int32), cache)
        t = int(np.argmax(np.asarray(lg.astype(mx.float32))[0, -1]))
        toks, want = [], []
        for _ in range(steps):
            chunk = [t] if positions == 1 else rng.integers(0, VOCAB, positions).tolist()
            toks += chunk
            rows = np.asarray(m(np.array([chunk], np.int32), cache).astype(mx.float32))[0]
            want += list(rows)
            t = int(np.argmax(rows[-1]))
        cache = m.make_cache()
        m(np.array([ids], np.int32), cache)
        plan = base.gpu_step_plan(m, cache, positions)
    finally:
        base.set_gpu_decode_step(old)
    if plan is None:
        raise SystemExit("emulate_gpu_step: the kernel would not run this model and cache")
    return toks, np.stack(want), plan


def _reference_rows(m, prompt, steps, B, seed):
    """_reference for a batch of B prompts, row b's 3b tokens shorter and
    left-padded, as the engine runs them (a padding mask and per-row rotary
    positions; each row's greedy token a step): the tokens fed [steps * B],
    the logits, the plan and each step's rows' rotary positions."""
    import mlxcy as mx
    from mlxcy.models import base
    from tiny_models import VOCAB
    rng = np.random.default_rng(seed)
    pads = np.array([3 * b for b in range(B)], np.int32)
    ids = rng.integers(0, VOCAB, (B, prompt)).astype(np.int32)
    for b in range(B):
        ids[b, :pads[b]] = 0

    def fwd(x, cache, off):
        L = x.shape[1]
        k, q = np.arange(off + L), np.arange(off, off + L)
        mask = k[None, None, None, :] >= np.minimum(pads[:, None, None, None], q[None, None, :, None])
        return np.asarray(m(x, cache, mask, off - pads).astype(mx.float32))

    old = base.set_gpu_decode_step(False)
    try:
        cache = m.make_cache()
        t = fwd(ids, cache, 0)[:, -1].argmax(-1).astype(np.int32)
        toks, want, rpos = [], [], []
        for s in range(steps):
            toks += t.tolist()
            rpos += (prompt + s - pads).tolist()
            rows = fwd(t[:, None], cache, prompt + s)[:, 0]
            want += list(rows)
            t = rows.argmax(-1).astype(np.int32)
        cache = m.make_cache()
        fwd(ids, cache, 0)
        plan = base.gpu_step_plan(m, cache, 1, B)
    finally:
        base.set_gpu_decode_step(old)
    if plan is None:
        raise SystemExit("emulate_gpu_step: the kernel would not run this model and cache")
    return toks, np.stack(want), plan, rpos


def _emulate(plan, toks, positions, split, work, rows=1, rpos=None):
    """The kernel's logits [len(toks), V] for the tokens, `positions` a step
    (rows > 1: one a row), from the plan's table and caches."""
    from mlxcy.models import base
    c = plan["config"]
    t = str(np.asarray(plan["keys"][0]).dtype)
    if t not in TYPES:
        raise SystemExit(f"emulate_gpu_step: {t} models are not emulated")
    inp = _write_inputs(plan, toks, rows if rows > 1 else positions, base.step_table_per_layer(),
                        work / "in.bin", rpos)
    exe = build(dict(type=TYPES[t],
                     ints=dict(BITS=c["bits"], GS=c["group_size"] if c["bits"] else 0,
                               EBITS=c["ebits"], EGS=c["egs"] if c["ebits"] else 0,
                               D=c["D"], NQ=c["NQ"], NKV=c["NKV"], HD=c["HD"], FF=c["FF"],
                               V=c["V"], NL=c["L"], QKV_BIAS=bool(c["qkv_bias"]),
                               QK_NORM=bool(c["qk_norm"]), SLICE=split,
                               GEMMA=bool(plan["gemma"]), M=positions, ROWS=rows > 1),
                     floats=dict(EPS=c["eps"], QK_EPS=c["qk_eps"], SCALE=c["scale"],
                                 ESCALE=plan["embed_scale"])), work)
    out = work / "logits.bin"
    subprocess.run([str(exe), str(inp), str(out)], check=True, timeout=1800)
    return np.fromfile(out, np.float32).reshape(len(toks), c["V"])


def _write_inputs(plan, toks, positions, PL, path, rpos=None):
    """in.bin for MAIN: int64 header (entries, steps, layers, first position,
    largest capacity), each entry (1 and its offset in the blob, or 0 and its
    value), each layer's capacity, offsets (rotary table, tokens, the rows'
    rotary positions, then each layer's keys and values) and sizes (scratch,
    logits), the blob.  positions: tokens a step (a batch's rows)."""
    c = plan["config"]
    blob = bytearray()

    def put(a) -> int:
        blob.extend(bytes(-len(blob) % 64))
        o = len(blob)
        blob.extend(np.ascontiguousarray(a).tobytes())
        return o

    ent = []
    for i, (arr, row0, value) in enumerate(plan["table"]):
        layer, at = divmod(i, PL)
        if arr is not None:
            a = np.asarray(arr)
            ent += [1, put(a) + row0 * (a.strides[0] if a.ndim >= 2 else a.itemsize)]
        elif layer < c["L"] and at == PL - 3:      # the capacity: step_decode's to fill
            ent += [0, plan["caps"][layer]]
        else:
            ent += [0, value]
    maxcap = max(plan["caps"])
    M, nqkv = positions, (c["NQ"] + 2 * c["NKV"]) * c["HD"]
    scratch = (5 * c["D"] + M * (c["D"] + nqkv + c["NQ"] * c["HD"] + c["FF"])
               + M * c["NQ"] * ((maxcap + 31) // 32) * (c["HD"] + 2) + 4
               + 3 * M * c["D"])          # step_decode's (verify_step's Gemma buffers too)
    offs = [put(plan["inv_freq"].astype(np.float32)), put(np.array(toks, np.int32)),
            put(np.array(rpos if rpos is not None else [0], np.int32))]
    for k, v in zip(plan["keys"], plan["values"]):
        offs += [put(np.asarray(k)), put(np.asarray(v))]
    head = [len(plan["table"]), len(toks) // M, c["L"], plan["offset"], maxcap]
    with open(path, "wb") as f:
        for part in (head, ent, plan["caps"], offs, [scratch, c["V"], len(blob)]):
            f.write(np.array(part, np.int64).tobytes())
        f.write(bytes(blob))
    return path


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kind", default="gemma3_text")
    ap.add_argument("--prompt", type=int, default=40)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--window", type=int, default=48)
    ap.add_argument("--split", type=int, nargs="?", const=2, default=0, choices=(0, 2, 4, 8),
                    help="the MLP split over slices of this many 16-byte chunks of each down row")
    ap.add_argument("--head-dim", type=int, default=0, help="the tiny model's head_dim (16)")
    ap.add_argument("--hidden", type=int, default=0, help="the tiny model's hidden size (64)")
    ap.add_argument("--positions", type=int, default=1,
                    help="tokens a step (> 1: the several-positions kernel, verify_step)")
    ap.add_argument("--rows", type=int, default=1,
                    help="a batch of this many left-padded rows (verify_step's ROWS form)")
    ap.add_argument("--dtype", choices=sorted(TYPES),
                    help="the activations' (default: the checkpoint's, float32, or bfloat16 "
                         "with --bits)")
    ap.add_argument("--bits", type=int, default=0, choices=(0, 4, 8),
                    help="MLX's affine 4/8-bit layout (bfloat16 scales)")
    a = ap.parse_args()
    err, same = run(a.kind, a.prompt, a.steps, a.window, a.split, dtype=a.dtype, bits=a.bits,
                    positions=a.positions, head_dim=a.head_dim, rows=a.rows, hidden=a.hidden)
    exact = a.dtype in (None, "float32") and not a.bits
    print(f"{a.kind}, {f'{a.bits}-bit ' if a.bits else ''}{a.dtype or 'default'}, prompt {a.prompt}, {a.steps} "
          f"steps{f', split {a.split}' if a.split else ''}{f', {a.rows} rows' if a.rows > 1 else ''}: max relative error {err:.2e}, greedy ids "
          f"equal: {same}")
    sys.exit(0 if err <= (1e-4 if exact else 3e-2) and (same or not exact) else 1)


if __name__ == "__main__":
    main()
