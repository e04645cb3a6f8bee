"""Locate GPU-only failures: each probe runs in its own process, so one crash
(or a sticky CUDA error) cannot hide the next.  Each mlxcy probe has an
mlx.core twin ("mx_...") to tell an MLX bug from ours."""
import os
import subprocess
import sys

PRE = "import numpy as np, mlxcy as mc, mlx.core as mx\nrng = np.random.default_rng(0)\n"
GATHER = """
a = rng.uniform(-2, 2, (3, 2, 8)).astype(np.float32); b = rng.uniform(-2, 2, (4, 8, 5)).astype(np.float32)
li = np.array([0, 2, 1, 2], np.int32); ri = np.array([3, 0, 0, 1], np.int32)
want = np.stack([a[i] @ b[j] for i, j in zip(li, ri)])
"""
PROBES = {
    "mx_gather_mm": GATHER + "g = mx.gather_mm(mx.array(a), mx.array(b), mx.array(li), mx.array(ri)); print(np.abs(np.array(g) - want).max())",
    "mc_gather_mm": GATHER + "g = mc.gather_mm(mc.array(a), mc.array(b), mc.array(li), mc.array(ri)); print(np.abs(g.numpy() - want).max())",
    "mc_gather_mm_np_idx": GATHER + "g = mc.gather_mm(mc.array(a), mc.array(b), li, ri); print(np.abs(g.numpy() - want).max())",
    "mx_gather_mm_none": GATHER + "g = mx.gather_mm(mx.array(a), mx.array(b), None, mx.array([1, 2, 3])); print(np.array(g).shape)",
    "mc_gather_mm_none": GATHER + "g = mc.gather_mm(mc.array(a), mc.array(b), None, mc.array([1, 2, 3])); print(g.numpy().shape)",
    "mc_iter": "a = mc.array(np.arange(6, dtype=np.int32).reshape(3, 2)); print([r.tolist() for r in a])",
    "mc_repr": "a = mc.array(np.arange(6, dtype=np.int32).reshape(3, 2)); print(repr(a))",
    "mx_repr": "a = mx.array(np.arange(6, dtype=np.int32).reshape(3, 2)); print(repr(a))",
    "mc_bool": "print(bool(mc.array(1)), bool(mc.array(0.0)))",
    "mc_item": "print(int(mc.array(5)), float(mc.array(2.5)), [10, 20, 30][mc.array(1)])",
    "mc_reshape_list": "print(mc.reshape([1, 2, 3, 4, 5, 6], (3, 2)).numpy())",
    "mc_bf16_from_f64": "print(mc.array(np.ones(3), dtype=mc.bfloat16).numpy())",
}
QMM = """
K, N, gs, bits = {k}, 128, {gs}, {bits}
w = mx.array(rng.standard_normal((N, K)).astype(np.float32)); x = mx.array(rng.standard_normal(({m}, K)).astype(np.float32))
wq, s, b = mx.quantize(w, group_size=gs, bits=bits)
ref = x @ mx.dequantize(wq, s, b, group_size=gs, bits=bits).T
got = mx.quantized_matmul(x, wq, s, b, transpose=True, group_size=gs, bits=bits)
print('maxabs_ref', float(mx.abs(ref).max()), 'maxerr', float(mx.abs(got - ref).max()))
"""
for k, gs, bits, m in [(64, 64, 4, 1), (64, 64, 4, 12), (64, 64, 8, 12), (64, 32, 4, 12),
                       (128, 64, 4, 12), (128, 128, 4, 12), (256, 64, 4, 1)]:
    PROBES[f"mx_qmm_k{k}_gs{gs}_b{bits}_m{m}"] = QMM.format(k=k, gs=gs, bits=bits, m=m)
PROBES["mx_qembed_k64_gs64"] = """
w = mx.array(rng.standard_normal((96, 64)).astype(np.float32))
wq, s, b = mx.quantize(w, group_size=64, bits=4)
ids = mx.array([3, 5, 7])
e = mx.dequantize(wq[ids], s[ids], b[ids], group_size=64, bits=4)
print('embed maxabs', float(mx.abs(e).max()), 'err', float(mx.abs(e - mx.dequantize(wq, s, b, group_size=64, bits=4)[ids]).max()))
"""
PROBES["mx_tiny_mlx_lm"] = """
import sys, tempfile; sys.path.insert(0, 'tests')
from tiny_models import make_tiny, ids_for
from mlx_lm import convert
from mlx_lm.utils import load_model
d = tempfile.mkdtemp()
make_tiny('llama', d + '/hf')
convert(d + '/hf', d + '/q', quantize=True, q_bits=4)
m, _ = load_model(__import__('pathlib').Path(d + '/q'))
ids = mx.array(ids_for(batch=2))
h = m.model.embed_tokens(ids); mx.eval(h); print('embed', float(mx.abs(h).max()))
for i, l in enumerate(m.model.layers):
    h = l(h, mask='causal', cache=None); mx.eval(h); print('layer', i, float(mx.abs(h).max()))
print('logits', float(mx.abs(m(ids)).max()))
"""
only = sys.argv[1:]
for name, code in PROBES.items():
    if only and name not in only:
        continue
    r = subprocess.run([sys.executable, "-X", "faulthandler", "-c", PRE + code],
                       capture_output=True, text=True, timeout=120)
    lines = [l for l in (r.stdout + r.stderr).strip().splitlines() if "site-packages" not in l]
    print(f"{name}: rc={r.returncode} {' | '.join(lines[-4:])[:400]}", flush=True)
