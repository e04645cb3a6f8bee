#!/usr/bin/env bash
# Build the extensions in place, one build at a time (several people may share
# this tree). Usage: tools/build.sh [mlxcy.mod1,mlxcy.mod2]   (default: all)
set -euo pipefail
cd "$(dirname "$0")/.."
export MLXCY_MODULES="${1:-}"
exec flock /tmp/mlxcy-build.lock python setup.py -q build_ext --inplace -j 2 2>&1 \
  | grep -v -E "FutureWarning|warn\(|Wsign-compare|^\s*\||^\s*$|In function|note:" || true
