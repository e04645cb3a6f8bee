"""Compile mlxcy's CUDA kernel sources (include/mlxcy/gpu_*.h) with nvcc, no GPU needed.

MLX compiles them at run time with NVRTC (mx::fast::cuda_kernel) on the first
call for each shape; this catches compile errors before a GPU session.  It
writes the same kind of translation unit MLX generates (device code at file
scope, then one kernel per instantiation with the template constants declared
in its body) and compiles it for sm_90:

    python tools/check_gpu_kernels.py [--keep DIR] [--ptxas-verbose] [--sass N] [--only N,M]

--sass N writes step kernel N's machine code (SASS, from cuobjdump and nvdisasm:
on PATH, or the `nvidia-cuda-cuobjdump` and `nvidia-cuda-nvdisasm` wheels') to
DIR/step_N.sass and counts its memory instructions by kind: what ptxas
scheduled, e.g. whether a product's loads are issued together
(LDG.E.128.CONSTANT in a run) or one at a time after a use, and which go
through generic addressing (LD.E: a pointer the compiler could not place in
global memory).
"""
from __future__ import annotations

import argparse
import collections
import glob
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CTYPE = {"bf16": "__nv_bfloat16", "f16": "__half", "f32": "float"}

PRELUDE = """\
#include <cstdint>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cooperative_groups.h>
"""


def raw_strings(header: Path) -> dict[str, str]:
    """name of each `inline const char* NAME() { return R"CUDA(...)CUDA"; }` -> text."""
    text = header.read_text()
    pat = re.compile(r'inline const char\* (\w+)\(\) \{\s*return R"CUDA\((.*?)\)CUDA";', re.S)
    return {m.group(1): m.group(2) for m in pat.finditer(text)}


def gemv_kernel(i: int, body: str, t: str, **c) -> str:
    """One instantiation of the gemv kernel, declared as MLX declares it."""
    ty = CTYPE[t]
    wty = "uint32_t" if c["BITS"] else ty
    consts = "".join(f"  constexpr {'bool' if isinstance(v, bool) else 'int'} {k} = "
                     f"{str(v).lower() if isinstance(v, bool) else v};\n" for k, v in c.items())
    return (f"namespace mlx::core::cu {{\n__global__ void gemv_{i}(const {ty}* x, const int* x_shape,"
            f" const {ty}* nw, const {wty}* w, const int* w_shape, const {ty}* scales, const {ty}* qbiases,"
            f" const {ty}* bias, const {ty}* res, {ty}* y) {{\n  using T = {ty};\n{consts}{body}}}\n}}\n")


def gemv_cases():
    eps = 0x3727C5AC   # 1e-5
    for t, bits, gs, rt, ks in (("bf16", 0, 0, 1, 4), ("f16", 4, 64, 8, 1), ("f32", 0, 0, 4, 2),
                                ("bf16", 4, 32, 2, 8), ("bf16", 8, 128, 8, 2)):
        yield t, dict(K=2048, KS=ks, RT=rt, BITS=bits, GS=gs, NORM=True, BIAS=True, RES=False,
                      ACT=0, EPS_BITS=eps)
        yield t, dict(K=1536, KS=ks, RT=rt, BITS=bits, GS=gs, NORM=True, BIAS=False, RES=False,
                      ACT=1, EPS_BITS=eps)
        yield t, dict(K=8192, KS=ks, RT=rt, BITS=bits, GS=gs, NORM=False, BIAS=False, RES=True,
                      ACT=2, EPS_BITS=eps)


def step_kernel(i: int, t: str, L: int, **c) -> str:
    """One instantiation of the whole-step kernel (include/mlxcy/gpu_step.h),
    with the body its launch code generates for L layers."""
    ty = CTYPE[t]
    timed = c.pop("TIMED", False)                     # MLXCY_STEP_TIMING's clock readings
    rows = c.pop("ROWS", False)                       # verify_step's batch form
    c = {"EBITS": c["BITS"], "EGS": c["GS"], **c}     # the embedding's format: the layers' unless given
    if "M" not in c:
        c.setdefault("SLICE", 0)                      # the MLP split: chunks of a down row a slice
    c.setdefault("GEMMA", False)                      # Gemma 3's block
    c.setdefault("ESCALE_BITS", 0)                    # its embedding's factor
    consts = "".join(f"  constexpr {'bool' if isinstance(v, bool) else 'int'} {k} = "
                     f"{str(v).lower() if isinstance(v, bool) else v};\n" for k, v in c.items())
    kv = "".join(f", const {ty}* {n}{l}" for n in "kv" for l in range(L))
    kinit = ", ".join(f"const_cast<T*>(k{l})" for l in range(L))
    vinit = ", ".join(f"const_cast<T*>(v{l})" for l in range(L))
    fn, m = ("verify_step", ", M, " + ("true" if rows else "false") + ", GEMMA") if "M" in c \
        else ("decode_step", ", SLICE, GEMMA")        # M positions (or rows)
    tm = (", rpos" if rows else ", nullptr") + ", __int_as_float(ESCALE_BITS)" if "M" in c \
        else ", timing" if timed else ", nullptr"
    return (f"namespace mlx::core::cu {{\n__global__ void step_{i}(const int32_t* tok, "
            f"const int32_t* meta, const uint64_t* table, const float* inv_freq, "
            f"const uint32_t* bar, const {ty}* after{', const int32_t* rpos' if rows else ''}{kv}, "
            f"{ty}* logits, float* scratch"
            f"{', uint32_t* timing' if timed else ''}) {{\n  using T = {ty};\n"
            f"  constexpr int NL = {L};\n{consts}"
            f"  T* kc[NL] = {{{kinit}}};\n  T* vc[NL] = {{{vinit}}};\n"
            f"  mlxcy_step::{fn}<T, BITS, GS, EBITS, EGS, D, NQ, NKV, HD, FF, V, NL, QKV_BIAS, QK_NORM{m}>("
            f"tok, meta, reinterpret_cast<const unsigned long long*>(table), inv_freq, kc, vc, "
            f"__int_as_float(EPS_BITS), __int_as_float(QK_EPS_BITS), __int_as_float(SCALE_BITS), "
            f"{'' if 'M' in c else '__int_as_float(ESCALE_BITS), '}"
            f"scratch, logits, const_cast<unsigned*>(bar){tm});\n}}\n}}\n")


def step_cases():
    norms = dict(EPS_BITS=0x3727C5AC, QK_EPS_BITS=0x3727C5AC, SCALE_BITS=0x3E000000)
    # Llama-3.2-1B bf16, Qwen3-0.6B 4-bit, SmolLM2 8-bit, Qwen3-0.6B bf16, SmolLM2
    # 4-bit, a tiny float32 model
    yield "bf16", 16, dict(BITS=0, GS=0, D=2048, NQ=32, NKV=8, HD=64, FF=8192, V=128256,
                           QKV_BIAS=False, QK_NORM=False, **norms)
    yield "bf16", 28, dict(BITS=4, GS=64, D=1024, NQ=16, NKV=8, HD=128, FF=3072, V=151936,
                           QKV_BIAS=False, QK_NORM=True, **norms)
    yield "bf16", 30, dict(BITS=8, GS=64, D=576, NQ=9, NKV=3, HD=64, FF=1536, V=49152,
                           QKV_BIAS=True, QK_NORM=False, **norms)
    yield "bf16", 28, dict(BITS=0, GS=0, D=1024, NQ=16, NKV=8, HD=128, FF=3072, V=151936,
                           QKV_BIAS=False, QK_NORM=True, **norms)
    yield "bf16", 30, dict(BITS=4, GS=64, D=576, NQ=9, NKV=3, HD=64, FF=1536, V=49152,
                           QKV_BIAS=False, QK_NORM=False, **norms)
    yield "bf16", 30, dict(BITS=0, GS=0, D=576, NQ=9, NKV=3, HD=64, FF=1536, V=49152,
                           QKV_BIAS=False, QK_NORM=False, TIMED=True, SLICE=2, **norms)
    # the MLP split: Llama-3.2-1B bf16 and 4-bit, Qwen2-like 8-bit with biases, the tiny float32 model
    yield "bf16", 16, dict(BITS=0, GS=0, D=2048, NQ=32, NKV=8, HD=64, FF=8192, V=128256,
                           QKV_BIAS=False, QK_NORM=False, SLICE=8, **norms)
    yield "bf16", 16, dict(BITS=4, GS=64, D=2048, NQ=32, NKV=8, HD=64, FF=8192, V=128256,
                           QKV_BIAS=False, QK_NORM=False, SLICE=2, **norms)
    yield "bf16", 30, dict(BITS=8, GS=64, D=576, NQ=9, NKV=3, HD=64, FF=1536, V=49152,
                           QKV_BIAS=True, QK_NORM=False, SLICE=2, **norms)
    yield "f32", 2, dict(BITS=0, GS=0, D=64, NQ=4, NKV=2, HD=16, FF=128, V=96,
                         QKV_BIAS=True, QK_NORM=True, SLICE=2, **norms)
    yield "f32", 2, dict(BITS=0, GS=0, D=64, NQ=4, NKV=2, HD=16, FF=128, V=96,
                         QKV_BIAS=True, QK_NORM=True, **norms)
    # SmolLM2's Q4_1 GGUF as loaded on a GPU: float32, 4-bit layers, an 8-bit embedding (Q8_0)
    yield "f32", 30, dict(BITS=4, GS=32, EBITS=8, EGS=32, D=576, NQ=9, NKV=3, HD=64, FF=1536,
                          V=49152, QKV_BIAS=False, QK_NORM=False, **norms)
    yield "f32", 30, dict(BITS=4, GS=32, EBITS=8, EGS=32, D=576, NQ=9, NKV=3, HD=64, FF=1536,
                          V=49152, QKV_BIAS=False, QK_NORM=False, M=9, **norms)
    # Gemma 3 (the sandwich norms, GELU, head_dim 256): 270M bf16 split and not, 1B 4-bit,
    # 1B bf16 (split as step_slice splits it: 8 chunks), the tiny float32 model's shape
    gemma = dict(EPS_BITS=0x358637BD, QK_EPS_BITS=0x358637BD, SCALE_BITS=0x3D800000,
                 QKV_BIAS=False, QK_NORM=True, GEMMA=True)
    yield "bf16", 18, dict(BITS=0, GS=0, D=640, NQ=4, NKV=1, HD=256, FF=2048, V=262144,
                           ESCALE_BITS=0x41CA0000, SLICE=2, **gemma)
    yield "bf16", 18, dict(BITS=0, GS=0, D=640, NQ=4, NKV=1, HD=256, FF=2048, V=262144,
                           ESCALE_BITS=0x41CA0000, **gemma)
    yield "bf16", 26, dict(BITS=4, GS=64, D=1152, NQ=4, NKV=1, HD=256, FF=6912, V=262144,
                           ESCALE_BITS=0x42080000, SLICE=2, **gemma)
    yield "bf16", 26, dict(BITS=0, GS=0, D=1152, NQ=4, NKV=1, HD=256, FF=6912, V=262144,
                           ESCALE_BITS=0x42080000, SLICE=8, **gemma)
    yield "f32", 2, dict(BITS=0, GS=0, D=64, NQ=4, NKV=2, HD=16, FF=128, V=96,
                         ESCALE_BITS=0x41000000, **gemma)
    # several positions (verify_step): Llama-3.2-1B bf16 and SmolLM2 8-bit with 9, Qwen3-0.6B
    # 4-bit with 5, the tiny float32 model with 3
    yield "bf16", 16, dict(BITS=0, GS=0, D=2048, NQ=32, NKV=8, HD=64, FF=8192, V=128256,
                           QKV_BIAS=False, QK_NORM=False, M=9, **norms)
    yield "bf16", 30, dict(BITS=8, GS=64, D=576, NQ=9, NKV=3, HD=64, FF=1536, V=49152,
                           QKV_BIAS=True, QK_NORM=False, M=9, **norms)
    yield "bf16", 28, dict(BITS=4, GS=64, D=1024, NQ=16, NKV=8, HD=128, FF=3072, V=151936,
                           QKV_BIAS=False, QK_NORM=True, M=5, **norms)
    yield "f32", 2, dict(BITS=0, GS=0, D=64, NQ=4, NKV=2, HD=16, FF=128, V=96,
                         QKV_BIAS=True, QK_NORM=True, M=3, **norms)
    # a batch's rows (verify_step's ROWS form, products on the tensor cores): Llama-3.2-1B
    # bf16 with 12 (its most) and 4-bit with 12, Qwen3-0.6B 4-bit with 16 and bf16 with 32,
    # SmolLM2 bf16 with 59 (its most) and its Q4_1 GGUF (4-bit, group 32, an 8-bit embedding) with 40,
    # Qwen2.5-0.5B bf16 (q/k/v biases) with 20, the tiny float32 model (CUDA cores)
    yield "bf16", 16, dict(BITS=0, GS=0, D=2048, NQ=32, NKV=8, HD=64, FF=8192, V=128256,
                           QKV_BIAS=False, QK_NORM=False, M=12, ROWS=True, **norms)
    yield "bf16", 16, dict(BITS=4, GS=64, D=2048, NQ=32, NKV=8, HD=64, FF=8192, V=128256,
                           QKV_BIAS=False, QK_NORM=False, M=12, ROWS=True, **norms)
    yield "bf16", 28, dict(BITS=4, GS=64, D=1024, NQ=16, NKV=8, HD=128, FF=3072, V=151936,
                           QKV_BIAS=False, QK_NORM=True, M=16, ROWS=True, **norms)
    yield "bf16", 28, dict(BITS=0, GS=0, D=1024, NQ=16, NKV=8, HD=128, FF=3072, V=151936,
                           QKV_BIAS=False, QK_NORM=True, M=32, ROWS=True, **norms)
    yield "bf16", 30, dict(BITS=0, GS=0, D=576, NQ=9, NKV=3, HD=64, FF=1536, V=49152,
                           QKV_BIAS=False, QK_NORM=False, M=59, ROWS=True, **norms)
    yield "bf16", 30, dict(BITS=4, GS=32, EBITS=8, EGS=32, D=576, NQ=9, NKV=3, HD=64, FF=1536,
                           V=49152, QKV_BIAS=False, QK_NORM=False, M=40, ROWS=True, **norms)
    yield "bf16", 24, dict(BITS=0, GS=0, D=896, NQ=14, NKV=2, HD=64, FF=4864, V=151936,
                           QKV_BIAS=True, QK_NORM=False, M=20, ROWS=True, **norms)
    yield "f32", 2, dict(BITS=0, GS=0, D=64, NQ=4, NKV=2, HD=16, FF=128, V=96,
                         QKV_BIAS=True, QK_NORM=True, M=3, ROWS=True, **norms)
    # SmolLM2's Q4_1 GGUF in float32 with 32 rows (in two bfloat16 parts: 64 operand rows)
    yield "f32", 30, dict(BITS=4, GS=32, EBITS=8, EGS=32, D=576, NQ=9, NKV=3, HD=64, FF=1536,
                          V=49152, QKV_BIAS=False, QK_NORM=False, M=32, ROWS=True, **norms)
    # Gemma's several positions and batch rows: 270M bf16 with 9, 1B 4-bit rows in launches of 8
    yield "bf16", 18, dict(BITS=0, GS=0, D=640, NQ=4, NKV=1, HD=256, FF=2048, V=262144,
                           ESCALE_BITS=0x41CA0000, M=9, **gemma)
    yield "bf16", 26, dict(BITS=4, GS=64, D=1152, NQ=4, NKV=1, HD=256, FF=6912, V=262144,
                           ESCALE_BITS=0x42080000, M=8, ROWS=True, **gemma)


def cuobjdump() -> tuple[str, dict]:
    """cuobjdump (from PATH, else the nvidia-cuda-cuobjdump wheel's bin) and an
    environment whose PATH finds nvdisasm, which it runs."""
    env = dict(os.environ)
    for site in sys.path:     # the wheels' bin folders (nvidia/cu13/bin) after PATH's
        for b in glob.glob(str(Path(site) / "nvidia" / "cu*" / "bin")):
            env["PATH"] = env.get("PATH", "") + os.pathsep + b
    tools = [shutil.which(t, path=env["PATH"]) for t in ("cuobjdump", "nvdisasm")]
    if None in tools:
        raise SystemExit("check_gpu_kernels: --sass needs cuobjdump and nvdisasm "
                         "(pip install nvidia-cuda-cuobjdump nvidia-cuda-nvdisasm)")
    return tools[0], env


def write_sass(obj: Path, n: int) -> Path:
    """Step kernel n's SASS into obj's folder; prints its memory instructions' counts."""
    tool, env = cuobjdump()
    r = subprocess.run([tool, "-sass", str(obj)], capture_output=True, text=True, env=env)
    if r.returncode:
        raise SystemExit(f"check_gpu_kernels: cuobjdump failed: {r.stderr.strip()}")
    fn = re.compile(rf"Function : \S*\dstep_{n}E")
    body, take = [], False
    for line in r.stdout.splitlines():
        if "Function : " in line:
            take = bool(fn.search(line))
        if take:
            body.append(line)
    if not body:
        raise SystemExit(f"check_gpu_kernels: no step kernel {n}")
    out = obj.parent / f"step_{n}.sass"
    out.write_text("\n".join(body) + "\n")
    code = [line for line in body if re.search(r"/\*[0-9a-f]{4,}\*/", line)]   # (an address)
    # (LDL / STL: local memory, the stack and ptxas's spills)
    mem = re.compile(r"\s((?:LDGSTS|LDG|LDL|LD|STG|STL|ST|ATOMG|REDG)(?:\.[\w.]+)?)\s")
    ops = collections.Counter(m.group(1) for line in code for m in [mem.search(line)] if m)
    print(f"step_{n}: {out} ({len(code)} instructions); memory: " +
          ", ".join(f"{k} {v}" for k, v in sorted(ops.items())))
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--keep", help="write the .cu here and keep it")
    ap.add_argument("--ptxas-verbose", action="store_true", help="registers and spills per kernel")
    ap.add_argument("--sass", type=int, metavar="N", help="step kernel N's SASS (cuobjdump)")
    ap.add_argument("--only", metavar="N,M", help="only these step kernels, no gemv (seconds, "
                    "not minutes: e.g. registers and spills of the kernels a change touches)")
    a = ap.parse_args()
    cases = list(step_cases())
    only = None
    if a.only:
        try:
            only = {int(n) for n in a.only.split(",")}
        except ValueError:
            ap.error(f"--only: expected step kernel numbers, got {a.only!r}")
        if not only <= set(range(len(cases))):
            ap.error(f"--only: step kernels are 0 .. {len(cases) - 1}, got {a.only!r}")
    src = raw_strings(ROOT / "include/mlxcy/gpu_gemv.h")
    step = raw_strings(ROOT / "include/mlxcy/gpu_step.h")
    parts = [PRELUDE, src["gemv_device_source"], step["step_device_source"]]
    body = src["gemv_body_source"].replace("x_shape[0]", "x_shape[0]")
    gemv = [] if only else list(gemv_cases())
    steps = [(i, s) for i, s in enumerate(cases) if only is None or i in only]
    for i, (t, c) in enumerate(gemv):
        parts.append(gemv_kernel(i, body, t, **c))
    for i, (t, L, c) in steps:
        parts.append(step_kernel(i, t, L, **c))
    cu = "\n".join(parts)
    d = Path(a.keep) if a.keep else Path(tempfile.mkdtemp())
    d.mkdir(parents=True, exist_ok=True)
    f = d / "mlxcy_gpu_kernels.cu"
    f.write_text(cu)
    cmd = ["nvcc", "-std=c++17", "-arch=sm_90", "-c", "-o", str(d / "k.o"), str(f)]
    if a.ptxas_verbose:
        cmd.insert(1, "-Xptxas=-v")
    r = subprocess.run(cmd, capture_output=True, text=True)
    sys.stdout.write(r.stdout)
    sys.stderr.write(r.stderr)
    print(("ok" if r.returncode == 0 else "FAILED") + f": {len(gemv)} gemv kernels, "
          f"{len(steps)} step kernels, {f}")
    if r.returncode == 0 and a.sass is not None:
        write_sass(d / "k.o", a.sass)
    sys.exit(r.returncode)


if __name__ == "__main__":
    main()
