"""What a wheel ships: setuptools' build_py step copies exactly the package
files a wheel gets (the compiled modules come from build_ext), so running it
with every extension declared shows whether the generated .cpp files go in."""
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_ships_sources_but_not_generated_cpp(tmp_path):
    if not list((ROOT / "mlxcy").glob("*.cpp")):
        import pytest
        pytest.skip("no generated .cpp files in this checkout")
    p = subprocess.run([sys.executable, "setup.py", "-q", "build_py", "-d", str(tmp_path)],
                       cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr
    files = [f.relative_to(tmp_path).as_posix() for f in tmp_path.rglob("*") if f.is_file()]
    assert "mlxcy/core.pyx" in files and "mlxcy/core.pxd" in files
    # every layer's subpackage, its Cython sources and declarations (cimport-able)
    for f in ("mlxcy/cli/__init__.py", "mlxcy/cli/commands.py", "mlxcy/generation/__init__.py",
              "mlxcy/generation/engine.pyx", "mlxcy/generation/engine.pxd",
              "mlxcy/generation/sample.pxd", "mlxcy/models/cache.pxd",
              "mlxcy/distributed/__init__.py", "mlxcy/distributed/comm.pyx",
              "mlxcy/train/perplexity.py", "mlxcy/native/array.pxd"):
        assert f in files, f
    assert not [f for f in files if f.endswith(".cpp")]


def test_wheel_ships_a_stub_for_every_compiled_module(tmp_path):
    """Every .pyx (a compiled module) has its .pyi beside it in the built
    package, and the package is marked typed (py.typed, PEP 561).  No
    extension is declared (MLXCY_MODULES names none), so nothing is
    cythonized: this runs on a clean checkout too."""
    env = dict(os.environ, MLXCY_MODULES="mlxcy.__no_extension__")
    p = subprocess.run([sys.executable, "setup.py", "-q", "build_py", "-d", str(tmp_path)],
                       cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert p.returncode == 0, p.stderr
    files = {f.relative_to(tmp_path).as_posix() for f in tmp_path.rglob("*") if f.is_file()}
    compiled = [p.relative_to(ROOT).with_suffix("").as_posix()
                for p in sorted((ROOT / "mlxcy").rglob("*.pyx"))]
    assert len(compiled) >= 20 and "mlxcy/core" in compiled
    assert not [m for m in compiled if m + ".pyi" not in files], sorted(files)
    assert "mlxcy/py.typed" in files


def _header_depends():
    """setup.py's header_depends, taken out of the file (importing setup.py
    would run setup())."""
    import ast
    src = (ROOT / "setup.py").read_text()
    keep = [n for n in ast.parse(src).body
            if isinstance(n, (ast.Import, ast.ImportFrom))
            or (isinstance(n, ast.Assign) and n.targets[0].id in ("HEADER", "CIMPORT"))
            or (isinstance(n, ast.FunctionDef) and n.name == "header_depends")]
    ns = {}
    exec(compile(ast.Module(body=keep, type_ignores=[]), "setup.py", "exec"), ns)
    return ns["header_depends"]


def test_each_extension_is_rebuilt_when_a_header_it_includes_changes():
    deps = _header_depends()
    names = lambda m: {Path(p).name for p in deps(ROOT / m, ROOT)}   # noqa: E731
    base = names("mlxcy/models/base.pyx")
    # through mlxcy/native/gpu_step.pxd's extern block, and cpu_quant.h's own include
    assert {"gpu_step.h", "gpu_gemv.h", "cpu_quant.h", "cpu_quant_rows.h", "core.h"} <= base
    assert "gpu_step.h" not in names("mlxcy/cpu_kernels.pyx")
    assert names("mlxcy/tokenizer/_bpe.pyx") == set()
    assert names("mlxcy/memory.pyx") == {"heap.h"}
