#!/usr/bin/env bash
# One device call's worth of GPU checks for the one-kernel decode step, each
# step's output written to its own log under ${OUT:-/tmp/gpu-session} as it
# runs (line-buffered), so a call cut short by its time limit still returns
# what finished.  Run on the GPU machine after the MLX CUDA wheel is
# installed (docs/internals.md, "Tests on an NVIDIA GPU"):
#
#   tools/gpu_session.sh [tests|bench|profile|torch|verify|chain|positions|phases|timeline]...
#                                             (default: tests bench profile)
#
#   tests    tests/models/test_gpu_step.py
#   bench    bench_decode --ops: one kernel vs the op path vs mlx-lm (SmolLM2,
#            Qwen3-0.6B, Llama-3.2-1B; bf16 and 4-bit)
#   profile  gpu_step_profile: host build/wait and the kernel's device time
#   torch    bench_decode --torch-graph: the PyTorch CUDA-graph loop (bf16)
#   verify   the several-positions kernel: its GPU tests, then prompt lookup
#            vs plain decoding with verification as one kernel and op by op,
#            then the quoting summary's step times (bench_speculative --step-times)
#   chain    chained verifications (tuning's lookup_chain): their tests, then
#            prompt lookup vs plain decoding with chaining on and off
#   positions  the time of forwards of 1-16 positions (a verification), one
#            kernel vs op by op (bf16 SmolLM2, Llama-3.2-1B)
#   phases   the one-kernel step's time per phase from the blocks' clock
#            readings (MLXCY_STEP_TIMING; its test first)
#   timeline the kernels of steady steps: durations, device idle gaps, period
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-/tmp/gpu-session}"
mkdir -p "$out"
export PYTHONPATH=".:${PYTHONPATH:-}" PYTHONUNBUFFERED=1
models=smollm2-135m,qwen3-0.6b,llama-3.2-1b
steps=("$@")
[ ${#steps[@]} -eq 0 ] && steps=(tests bench profile)
for s in "${steps[@]}"; do
    case "$s" in
        tests) python -m pytest -q -p no:cacheprovider tests/models/test_gpu_step.py ;;
        bench) python benchmarks/bench_decode.py --models "$models" --quant bf16,4bit --ops ;;
        profile) python benchmarks/gpu_step_profile.py --models "$models" --quant bf16,4bit ;;
        torch) python benchmarks/bench_decode.py --models "$models" --quant bf16 --ops --torch-graph ;;
        verify) python -m pytest -q -p no:cacheprovider tests/models/test_gpu_step.py \
                    -k "several or engine or embedding or not_taken" &&
                for v in on off; do
                    python benchmarks/bench_speculative.py --models smol --max-tokens 128 \
                        --repeats 2 --gpu-verify $v
                done &&
                python benchmarks/bench_speculative.py --step-times ;;
        chain) python -m pytest -q -p no:cacheprovider tests/generation/test_speculative.py \
                   -k "chained or single" &&
               for c in on off; do
                   python benchmarks/bench_speculative.py --models smol --max-tokens 128 \
                       --repeats 3 --chain $c
               done ;;
        positions) python benchmarks/gpu_step_profile.py --models smollm2-135m,llama-3.2-1b \
                       --quant bf16 --positions 1,2,3,4,6,8,12,16 ;;
        phases) python -m pytest -q -p no:cacheprovider tests/models/test_gpu_step.py -k timing &&
                python benchmarks/gpu_step_profile.py --models "$models" --quant bf16,4bit \
                    --phases ;;
        timeline) python benchmarks/gpu_step_profile.py --models "$models" --quant bf16,4bit \
                      --timeline ;;
        *) echo "gpu_session.sh: unknown step $s" >&2; exit 2 ;;
    esac > "$out/$s.log" 2>&1
    echo "$s rc=$? $(grep -E 'passed|failed' "$out/$s.log" | tail -1)"
    grep '^|' "$out/$s.log"
done
