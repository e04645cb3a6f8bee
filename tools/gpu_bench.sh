#!/usr/bin/env bash
# Benchmarks on the GPU machine, each step under a time limit, logs in $OUT.
# Usage: tools/gpu_bench.sh STEP...   (steps: lora decode fold batch memab)
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-/tmp/gpu-bench}"
mkdir -p "$out"
step() {   # name limit command...
    local name=$1 lim=$2; shift 2
    local t0=$SECONDS
    timeout "$lim" "$@" >"$out/$name.log" 2>&1
    echo "== $name rc=$? $((SECONDS - t0))s"
}
for s in "$@"; do
    case $s in
    lora)
        for dt in float32 bfloat16; do
            step lora-$dt 150 python benchmarks/bench_lora.py --random --seq 256 --batch 8 --dtype $dt
            tail -3 "$out/lora-$dt.log"
        done
        step lora-ck 150 python benchmarks/bench_lora.py --random --seq 256 --batch 8 --dtype bfloat16 --grad-checkpoint
        tail -3 "$out/lora-ck.log" ;;
    decode)
        step decode 420 python benchmarks/bench_decode.py --rounds 3 --out "$out/decode.jsonl" \
            --models smollm2-135m,gemma-3-270m,qwen2.5-0.5b,qwen3-0.6b,llama-3.2-1b,gemma-3-1b
        grep '^|' "$out/decode.log" ;;
    fold)
        step fold 240 python benchmarks/bench_decode.py --rounds 3 --quant bf16 --fold-residual on \
            --models smollm2-135m,qwen3-0.6b,llama-3.2-1b --out "$out/fold.jsonl"
        grep '^|' "$out/fold.log" ;;
    batch)
        step batch 240 python benchmarks/bench_batch.py --device gpu --dtype bfloat16 --model-shape qwen3-0.6b \
            --n-prompts 512 --skip-classify --gen-batches 8,32,128 --repeats 3 --json "$out/batch.json"
        tail -12 "$out/batch.log" ;;
    memab)
        step memab 200 python benchmarks/decode_memory_ab.py --model qwen2.5-0.5b
        tail -12 "$out/memab.log" ;;
    esac
done
