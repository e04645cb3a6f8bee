"""Locate a GPU-only crash: each probe runs in its own process."""
import subprocess, sys
PRE = "import numpy as np, mlxcy as mx\nfrom mlxcy import fast\nx = mx.array(np.random.randn(1, 4, 8, 64).astype(np.float32)).astype(mx.bfloat16)\n"
PROBES = {
    "matmul": "print((x @ x.transpose(0,1,3,2)).sum().item())",
    "take": "w = mx.array(np.random.randn(100, 64).astype(np.float32)); print(mx.take(w, mx.array([1,2,3]), axis=0).sum().item())",
    "rms": "print(fast.rms_norm(x, mx.ones((64,), dtype=mx.bfloat16), 1e-5).sum().item())",
    "rope": "print(fast.rope(x, 64, traditional=False, base=1e4, scale=1.0, offset=3).sum().item())",
    "sdpa": "print(fast.scaled_dot_product_attention(x, x, x, scale=0.1).sum().item())",
    "sdpa_causal": "print(fast.scaled_dot_product_attention(x, x, x, scale=0.1, mask='causal').sum().item())",
    "sdpa_bool": "m = mx.array(np.tril(np.ones((8,8),bool))); print(fast.scaled_dot_product_attention(x, x, x, scale=0.1, mask=m).sum().item())",
    "compile": "f = mx.compile(lambda a: mx.sigmoid(a) * a, shapeless=True); print(f(x).sum().item())",
    "slice_update": "z = mx.zeros((1,4,16,64), dtype=mx.bfloat16); z[:, :, 0:8, :] = x; print(z.sum().item())",
    "tiny_model": """
from mlxcy.models import build_model
cfg = dict(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2, vocab_size=100, tie_word_embeddings=True, rms_norm_eps=1e-5, rope_theta=1e4)
from mlxcy.models.load import expected_shapes
W = {n: mx.array(np.random.randn(*s).astype(np.float32) * 0.1) for n, (s, k) in expected_shapes(cfg).items()}
m = build_model(cfg, W)
print("built", flush=True)
print(m([[1, 2, 3]]).sum().item())
""",
}
import os
MODE = os.environ.get("PROBE_PRE", "")
PRE = MODE + PRE
for name, code in PROBES.items():
    r = subprocess.run([sys.executable, "-X", "faulthandler", "-c", PRE + code], capture_output=True, text=True, timeout=120)
    tail = (r.stdout + r.stderr).strip().splitlines()[-3:]
    print(f"{name}: rc={r.returncode} {' | '.join(tail)[:300]}", flush=True)
