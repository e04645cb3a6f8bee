"""Another Cython module can cimport mlxcy and call MLX ops natively: compile a
small external extension against the installed package and run it."""
import sys
import subprocess
import textwrap

import numpy as np

import mlxcy
import subproc

EXT = textwrap.dedent('''
    # cython: language_level=3, cpp_locals=True
    from mlxcy.core cimport Array, wrap, handle
    from mlxcy.native cimport ops as nops
    from mlxcy.native.array cimport heap

    def fma(Array a, Array b, Array c):
        """a * b + c, built natively: no Python object but the result."""
        return wrap(heap(nops.add(nops.multiply(handle(a)[0], handle(b)[0]), handle(c)[0])))
''')

SETUP = textwrap.dedent('''
    import os, mlxcy
    from setuptools import Extension, setup
    from Cython.Build import cythonize
    pkg_root = os.path.dirname(os.path.dirname(mlxcy.__file__))
    libs = mlxcy.get_library_dirs()
    ext = Extension("extfma", ["extfma.pyx"], language="c++",
                    include_dirs=mlxcy.get_include(), library_dirs=libs, libraries=["mlx"],
                    runtime_library_dirs=libs, extra_compile_args=["-std=c++20", "-O1"])
    setup(ext_modules=cythonize([ext], include_path=[pkg_root], quiet=True),
          script_args=["build_ext", "--inplace", "-q"])
''')


def test_external_cython_module_cimports_mlxcy(tmp_path):
    (tmp_path / "extfma.pyx").write_text(EXT)
    (tmp_path / "setup.py").write_text(SETUP)
    r = subprocess.run([sys.executable, "setup.py"], cwd=tmp_path, capture_output=True,
                       text=True, env=subproc.env())
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    sys.path.insert(0, str(tmp_path))
    try:
        import extfma
        x, y, z = (np.arange(6, dtype=np.float32).reshape(2, 3) + k for k in range(3))
        out = extfma.fma(mlxcy.array(x), mlxcy.array(y), mlxcy.array(z))
        assert isinstance(out, mlxcy.Array)
        np.testing.assert_allclose(out.numpy(), x * y + z)
        a = mlxcy.array(x)
        a.free()
        try:
            extfma.fma(a, mlxcy.array(y), mlxcy.array(z))
        except ValueError as e:
            assert "freed" in str(e)
        else:
            raise AssertionError("a freed array was accepted")
    finally:
        sys.path.remove(str(tmp_path))
