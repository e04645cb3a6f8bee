"""Build benchmarks/native_timers.pyx (the native floors of overhead.py) in
place, against this checkout's mlxcy, and import it.

    python benchmarks/build_native_timers.py        # build (skipped when up to date)

overhead.py and asv_benchmarks/bench_overhead.py call load(), which builds on
first use.  The module cimports mlxcy like any external Cython code
(tests/test_cimport.py checks that path), so it is not part of the package.
"""
import importlib
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
NAME = "native_timers"

SETUP = """
import mlxcy
from Cython.Build import cythonize
from setuptools import Extension, setup
libs = mlxcy.get_library_dirs()
ext = Extension({name!r}, [{name!r} + ".pyx"], language="c++", include_dirs=mlxcy.get_include(),
                library_dirs=libs, libraries=["mlx"], runtime_library_dirs=libs,
                extra_compile_args=["-std=c++20", "-O2", "-Wno-unused-function"])
setup(ext_modules=cythonize([ext], include_path=[{root!r}], quiet=True),
      script_args=["build_ext", "--inplace", "-q"])
"""


def _built():
    """The built module's path, or None when it is missing or older than its
    source or than mlxcy.core's build."""
    pyx = HERE / (NAME + ".pyx")
    sos = sorted(HERE.glob(NAME + ".*.so"))
    core = sorted((ROOT / "mlxcy").glob("core.*.so"))
    if not sos:
        return None
    newest_input = max([pyx.stat().st_mtime] + [c.stat().st_mtime for c in core])
    return sos[-1] if sos[-1].stat().st_mtime >= newest_input else None


def build():
    """Compile native_timers in benchmarks/ unless it is up to date."""
    if _built() is not None:
        return
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    r = subprocess.run([sys.executable, "-c", SETUP.format(name=NAME, root=str(ROOT))],
                       cwd=HERE, env=env, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"building benchmarks/{NAME}.pyx failed:\n"
                           f"{r.stdout[-3000:]}{r.stderr[-3000:]}")


def load():
    """The native_timers module, built first when needed."""
    build()
    if str(HERE) not in sys.path:
        sys.path.insert(0, str(HERE))
    return importlib.import_module(NAME)


if __name__ == "__main__":
    build()
    print(_built())
