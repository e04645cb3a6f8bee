#!/usr/bin/env bash
# GPU-machine steps for mlxcy's own decode kernels (issue 19), each under a time
# limit, logs in $OUT.  Run from the tree to test, after .gpu/b/install.sh:
#   tools/gpu_kernels_run.sh build tests gemv decode profile
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-/tmp/gpu-kernels}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1
. tools/steps.sh
for s in "$@"; do
    case $s in
    build)
        MLXCY_JOBS=12 step build 300 python setup.py -q build_ext --inplace
        tail -5 "$out/build.log" ;;
    tests)
        step tests 300 python -m pytest -q -n 6 -p no:cacheprovider tests/test_gpu_kernels.py
        tail -15 "$out/tests.log" ;;
    parity)
        step parity 300 python -m pytest -q -n 4 -p no:cacheprovider tests/models/test_models_parity.py tests/generation/test_generate.py
        tail -6 "$out/parity.log" ;;
    gemv)
        step gemv 240 python benchmarks/bench_gemv.py --rows 1,8 --reps 50
        grep '^|' "$out/gemv.log" ;;
    decode)
        step decode 330 python benchmarks/bench_decode.py --rounds 1 --out "$out/decode.jsonl" \
            --models smollm2-135m,qwen3-0.6b,llama-3.2-1b --quant bf16,4bit
        grep '^|' "$out/decode.log" ;;
    profile)
        step profile 200 python benchmarks/decode_profile.py --models smollm2-135m,llama-3.2-1b \
            --quant bf16,4bit --kernels
        grep '^|' "$out/profile.log" ;;
    esac
done
