#!/usr/bin/env bash
# Run the test suite on the GPU machine, one pytest process per test file
# (so a crash in one file cannot poison the CUDA context of the others), a few
# files at a time.  Logs and junit files go to ${OUT:-/tmp/gpu-tests}.
# Usage: tools/gpu_tests.sh [parallel_files] [test files...]
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-/tmp/gpu-tests}"
mkdir -p "$out"
par="${1:-4}"; shift || true
files=("$@")
[ ${#files[@]} -eq 0 ] && mapfile -t files < <(find tests -name "test_*.py" | sort)
run_one() {
    f="$1"; out="$2"; n=$(basename "$f" .py)
    timeout 540 python -m pytest -q -n 2 -p no:cacheprovider "$f" --junitxml="$out/$n.xml" >"$out/$n.log" 2>&1
    echo "$n rc=$? $(tail -1 "$out/$n.log")"
}
export -f run_one
printf '%s\n' "${files[@]}" | xargs -P "$par" -I{} bash -c 'run_one {} '"$out" | sort > "$out/summary.txt"
cat "$out/summary.txt"
