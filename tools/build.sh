#!/usr/bin/env bash
# Build the extensions in place, one build at a time (several people may share
# this tree). Usage: tools/build.sh [mlxcy.mod1,mlxcy.mod2]   (default: all)
# Exits non-zero when the build fails; prints only errors and Cython warnings.
set -uo pipefail
cd "$(dirname "$0")/.."
export MLXCY_MODULES="${1:-}"
log=$(mktemp)
flock /tmp/mlxcy-build.lock python setup.py -q build_ext --inplace -j 2 >"$log" 2>&1
rc=$?
grep -E "error|Error|^warning: mlxcy|^mlxcy/.*pyx:[0-9]+" -A0 "$log" | grep -v Wsign-compare | head -80
if [ $rc -ne 0 ]; then tail -40 "$log"; fi
rm -f "$log"
exit $rc
