# Sourced by the GPU-machine scripts (tools/gpu_bench.sh, tools/gpu_kernels_run.sh):
# step NAME LIMIT COMMAND... runs COMMAND under a time limit, its output in
# $out/NAME.log, and prints "== NAME rc=... Ns".
step() {
    local name=$1 lim=$2; shift 2
    local t0=$SECONDS
    timeout "$lim" "$@" >"$out/$name.log" 2>&1
    echo "== $name rc=$? $((SECONDS - t0))s"
}
