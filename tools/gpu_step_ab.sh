#!/usr/bin/env bash
# A/B of the one-token kernel's device code on the GPU machine: this tree
# (built here, after the MLX CUDA wheel is installed: docs/internals.md, "Tests
# on an NVIDIA GPU") against other versions of include/mlxcy/gpu_step.h, each
# built into a copy of the tree (only mlxcy.models.base includes the header),
# then profiled in turns, one process each:
#
#   tools/gpu_step_ab.sh NAME=HEADER|NAME=DIR|NAME=FILE.diff... [-- gpu_step_profile.py arguments]
#
#   e.g. tools/gpu_step_ab.sh early=.gpu/b/x_early.h -- --models smollm2-135m,llama-3.2-1b --phases
#
# A DIR holds files to lay over the copy at the same paths (another version
# of any source files, e.g. a branch's changes); the copy is then rebuilt
# whole.  A FILE.diff (or .patch: `git diff` output) is applied to the copy;
# one that touches only gpu_step.h rebuilds only the module that includes it.
# A diff keeps applying as the tree moves on, where a whole header would undo
# what changed since it was taken.
#
# "main" is this tree.  Each run's output goes to ${OUT:-/tmp/gpu-ab}/NAME.log
# as it runs; the table rows are printed with the variant's name.  ROUNDS
# (default 1) repeats the turns.
set -uo pipefail
cd "$(dirname "$0")/.."
here=$(pwd)
out="${OUT:-/tmp/gpu-ab}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1
variants=(); args=()
while [ $# -gt 0 ]; do
    [ "$1" = "--" ] && { shift; args=("$@"); break; }
    variants+=("$1"); shift
done
[ ${#args[@]} -eq 0 ] && args=(--models smollm2-135m,llama-3.2-1b --quant bf16)
MLXCY_JOBS=${MLXCY_JOBS:-16} python setup.py -q build_ext --inplace > "$out/build-main.log" 2>&1 ||
    { tail -20 "$out/build-main.log"; exit 1; }
names=(main); dirs=("$here")
# only mlxcy.models.base includes gpu_step.h: a copy whose change is the header
# rebuilds just that module
header_only() { touch "$dir/mlxcy/models/base.pyx"; mods=(MLXCY_MODULES=mlxcy.models.base); }
for v in "${variants[@]}"; do
    name=${v%%=*}; src=${v#*=}; dir=/tmp/gpu-ab-$name
    rm -rf "$dir" && mkdir -p "$dir" && tar --exclude=./.gpu -cf - . | tar -C "$dir" -xf -
    mods=()                     # (the modules to rebuild: all, unless header_only)
    if [ -d "$src" ]; then      # files laid over the tree (their paths under src): rebuild all
        cp -r "$src/." "$dir/"
    elif [[ "$src" == *.diff || "$src" == *.patch ]]; then   # a diff against this tree
        src=$(realpath "$src")
        (cd "$dir" && git apply "$src") || { echo "== $name: $src does not apply"; continue; }
        [ "$(cd "$dir" && git apply --numstat "$src" | cut -f3 | sort -u)" = include/mlxcy/gpu_step.h ] &&
            header_only
    else                        # a gpu_step.h
        cp "$src" "$dir/include/mlxcy/gpu_step.h" && header_only
    fi
    # (a failed build leaves the copy's modules as this tree built them: marked,
    # so that its rows are not read as the variant's)
    (cd "$dir" && env MLXCY_JOBS=4 ${mods[@]+"${mods[@]}"} \
        python setup.py -q build_ext --inplace > "$out/build-$name.log" 2>&1 ||
        { echo "build of $name failed"; tail -5 "$out/build-$name.log"; touch .build-failed; }) &
    names+=("$name"); dirs+=("$dir")
done
wait
for round in $(seq "${ROUNDS:-1}"); do
    for i in "${!names[@]}"; do
        if [ -e "${dirs[$i]}/.build-failed" ]; then
            echo "== ${names[$i]}: its build failed, not timed"; continue
        fi
        (cd "${dirs[$i]}" && PYTHONPATH="${dirs[$i]}:${PYTHONPATH:-}" timeout 300 \
            python benchmarks/gpu_step_profile.py "${args[@]}") > "$out/${names[$i]}-$round.log" 2>&1
        echo "== ${names[$i]} (round $round) rc=$?"
        grep -E '^\| [a-z]' "$out/${names[$i]}-$round.log" | grep -v '^| model' | cut -c1-160
    done
done
