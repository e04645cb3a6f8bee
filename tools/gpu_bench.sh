#!/usr/bin/env bash
# Benchmarks on the GPU machine, each step under a time limit, logs in $OUT.
# Usage: tools/gpu_bench.sh STEP...   (steps: lora loramem lorac loradiag decode batch memab)
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-/tmp/gpu-bench}"
mkdir -p "$out"
. tools/steps.sh
for s in "$@"; do
    case $s in
    lora)
        for dt in float32 bfloat16; do
            step lora-$dt 150 python benchmarks/bench_lora.py --random --seq 256 --batch 8 --dtype $dt
            tail -3 "$out/lora-$dt.log"
        done
        step lora-ck 150 python benchmarks/bench_lora.py --random --seq 256 --batch 8 --dtype bfloat16 --grad-checkpoint
        tail -3 "$out/lora-ck.log" ;;
    loramem)
        # the bf16 step's peak with TrainStep's memory_limit off, and "auto" with
        # several margins (each side alone; mlxcy only), checkpoint and float32 too
        a="--random --seq 256 --batch 8 --dtype bfloat16"
        side() {   # name extra-args...
            local name=$1; shift
            step "lm-$name" 170 python benchmarks/bench_lora.py $a --side mlxcy "$@"
            r=$(grep RESULT "$out/lm-$name.log" | sed 's/RESULT //')
            python -c "import json,sys; r=json.loads(sys.argv[2] or '{}'); print(f\"{sys.argv[1]:24} tok/s {r.get('tokens_per_s',0):9.0f}  peak GB {r.get('peak_mem_gb',0):.3f}\")" "$name" "$r"
        }
        side off --memory-limit off
        for m in 0 0.1 0.25 0.5; do side auto-$m --memory-margin $m; done
        side off-again --memory-limit off
        side ck-off --memory-limit off --grad-checkpoint
        side ck-auto --grad-checkpoint ;;
    lorarows)
        # the three rows side by side with the defaults (compiled, memory_limit auto)
        step lora-bfloat16 200 python benchmarks/bench_lora.py --random --seq 256 --batch 8 --dtype bfloat16
        tail -3 "$out/lora-bfloat16.log"
        step lora-float32 200 python benchmarks/bench_lora.py --random --seq 256 --batch 8 --dtype float32
        tail -3 "$out/lora-float32.log"
        step lora-ck 200 python benchmarks/bench_lora.py --random --seq 256 --batch 8 --dtype bfloat16 --grad-checkpoint
        tail -3 "$out/lora-ck.log" ;;
    lorac)
        # the compiled training step: per-step times first (a small shape, with a
        # Python traceback on SIGABRT and, where gdb exists, native stacks), then the
        # side-by-side benchmark
        t0=$SECONDS
        python -X faulthandler benchmarks/bench_lora.py --random --seq 64 --batch 4 --dtype bfloat16 \
            --steps 2 --warmup 2 --side mlxcy --compile on >"$out/lorac-probe.log" 2>&1 &
        pid=$!
        while kill -0 $pid 2>/dev/null && [ $((SECONDS - t0)) -lt 120 ]; do sleep 2; done
        if kill -0 $pid 2>/dev/null; then
            command -v gdb >/dev/null && gdb -p $pid -batch -ex "thread apply all bt 25" >"$out/lorac-gdb.log" 2>&1
            kill -ABRT $pid; sleep 3; kill -9 $pid 2>/dev/null
            echo "== lorac-probe HUNG after $((SECONDS - t0))s"; tail -c 3000 "$out/lorac-gdb.log" 2>/dev/null
        fi
        wait $pid; echo "== lorac-probe rc=$? $((SECONDS - t0))s"
        tail -c 2500 "$out/lorac-probe.log"
        grep -q RESULT "$out/lorac-probe.log" || continue
        for dt in float32 bfloat16; do
            step lorac-$dt 150 python benchmarks/bench_lora.py --random --seq 256 --batch 8 --dtype $dt --compile on
            tail -3 "$out/lorac-$dt.log"
        done
        step lorac-ck 150 python benchmarks/bench_lora.py --random --seq 256 --batch 8 --dtype bfloat16 --grad-checkpoint --compile on
        tail -3 "$out/lorac-ck.log" ;;
    loradiag)
        # where the compiled step's first-call time and memory go: each side with a
        # cold kernel (PTX) cache of its own, then mlxcy again with its cache warm
        a="--random --seq 256 --batch 8 --dtype bfloat16 --steps 2 --warmup 2 --compile on"
        MLX_PTX_CACHE_DIR=/tmp/ptx-mlxcy step loradiag-mlxcy 170 python benchmarks/bench_lora.py $a --side mlxcy
        grep -E "^step|RESULT" "$out/loradiag-mlxcy.log"; echo "ptx modules: $(ls /tmp/ptx-mlxcy 2>/dev/null | grep -c ptx$)"
        MLX_PTX_CACHE_DIR=/tmp/ptx-mlxlm step loradiag-mlxlm 120 python benchmarks/bench_lora.py $a --side mlx-lm
        grep RESULT "$out/loradiag-mlxlm.log"; echo "ptx modules: $(ls /tmp/ptx-mlxlm 2>/dev/null | grep -c ptx$)"
        MLX_PTX_CACHE_DIR=/tmp/ptx-mlxcy step loradiag-mlxcy-warm 120 python benchmarks/bench_lora.py $a --side mlxcy
        grep -E "^step|RESULT" "$out/loradiag-mlxcy-warm.log" ;;
    decode)
        step decode 420 python benchmarks/bench_decode.py --rounds 3 --out "$out/decode.jsonl" \
            --models smollm2-135m,gemma-3-270m,qwen2.5-0.5b,qwen3-0.6b,llama-3.2-1b,gemma-3-1b
        grep '^|' "$out/decode.log" ;;
    batch)
        step batch 240 python benchmarks/bench_batch.py --device gpu --dtype bfloat16 --model-shape qwen3-0.6b \
            --n-prompts 512 --skip-classify --gen-batches 8,32,128 --repeats 3 --json "$out/batch.json"
        tail -12 "$out/batch.log" ;;
    memab)
        step memab 200 python benchmarks/decode_memory_ab.py --model qwen2.5-0.5b
        tail -12 "$out/memab.log" ;;
    esac
done
