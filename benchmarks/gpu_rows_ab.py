"""A batch's one-token steps as the one-kernel GPU step (its batch form) against
MLX's ops, through the generation engine, the two taking turns each round:

    python benchmarks/gpu_rows_ab.py [--model qwen3-0.6b] [--batches 4,8,16,32,64]
                                     [--max-tokens 48] [--rounds 2]

Random weights of the model's real shape (bench_decode.random_hf_dir; no
tokenizer needed), bfloat16, random prompts of 8-31 tokens, greedy.  Prints
generated tokens/s of the whole batch (prefill included) per round and the
steps the kernel ran; the first round of each batch size also compiles its
kernel, so read the later rounds."""
import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_decode import random_hf_dir  # noqa: E402


def run(m, prompts, max_tokens):
    """Generated tokens/s of one engine run over the prompts."""
    from mlxcy.generation.engine import Engine
    eng = Engine(m, max_batch=len(prompts))
    for p in prompts:
        eng.add(p, max_tokens=max_tokens)
    t0, n = time.perf_counter(), 0
    while eng.has_work():
        n += len(eng.step())
    eng.close()
    return n / (time.perf_counter() - t0)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="qwen3-0.6b")
    ap.add_argument("--batches", default="4,8,16,32,64")
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--rounds", type=int, default=2)
    a = ap.parse_args()
    from mlxcy import device as dev
    dev.set_default_device(dev.gpu)
    from mlxcy.models import base
    from mlxcy.models.load import load_model
    m = load_model(random_hf_dir(a.model, Path(tempfile.mkdtemp())), dtype="bfloat16")
    rng = np.random.default_rng(0)
    batches = [int(b) for b in a.batches.split(",")]
    lengths = rng.integers(8, 32, max(batches))
    everyone = [rng.integers(0, 1000, int(n)).tolist() for n in lengths]
    for b in batches:
        for r in range(a.rounds):
            for on in (True, False):
                base.set_gpu_rows_step(on)
                before = base.gpu_decode_steps()
                tps = run(m, everyone[:b], a.max_tokens)
                print(f"{a.model} batch {b:>3} round {r + 1} kernel {'on ' if on else 'off'}: "
                      f"{tps:8.1f} tok/s, kernel steps {base.gpu_decode_steps() - before}",
                      flush=True)
    m.close()


if __name__ == "__main__":
    main()
