"""The type stubs (.pyi) of mlxcy's compiled modules, checked against the
modules themselves and against a user's code.

- every compiled module of the imported package has its .pyi beside it, and
  the package is marked typed (py.typed);
- mypy.stubtest finds no difference between the stubs and the imported
  modules (names, signatures, defaults, classes, properties; an allowlist
  covers only genuine false positives, each with its reason);
- stubtest does fail on a wrong stub (a copy of the stubs with one broken);
- mypy --strict accepts a user's script over the public API
  (tests/typecheck/user_api.py) and rejects each misuse in
  tests/typecheck/bad_api.py with the expected error.

Everything runs on the mlxcy that this process imports (an in-place build or
the installed package), through tests/subproc.py.  stubtest covers the
extension modules only: run over the whole package it takes minutes (mypy
follows the pure-Python modules into transformers, torch, starlette...),
and the pure-Python modules carry their own annotations.
"""
import importlib.machinery
import os
import re
import shutil
import site
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

import subproc

pytest.importorskip("mypy")

HERE = Path(__file__).resolve().parent
ALLOWLIST = HERE / "stubtest_allowlist.txt"
PKG = Path(subproc.PKG_PARENT) / "mlxcy"


def extension_modules():
    """Dotted names of the compiled modules in the imported package."""
    suffixes = tuple(importlib.machinery.EXTENSION_SUFFIXES)
    mods = []
    for p in sorted(PKG.rglob("*")):
        if p.is_file() and p.name.endswith(suffixes):
            stem = p.name.split(".", 1)[0]
            rel = p.parent.relative_to(PKG.parent).parts
            mods.append(".".join(rel + (stem,)))
    return mods


def _site_dirs():
    dirs = set(site.getsitepackages()) | {site.getusersitepackages()}
    dirs |= {sysconfig.get_paths()[k] for k in ("purelib", "platlib")}
    return {os.path.realpath(d) for d in dirs}


def mypy_env(stub_root=None):
    """subproc.env() with MYPYPATH pointing mypy at the package under test:
    an in-place build is found through MYPYPATH, an installed package through
    site-packages (which mypy refuses on MYPYPATH).  stub_root: a folder
    holding another copy of the package's .py/.pyi files, searched first by
    mypy; it goes last on PYTHONPATH, so that the modules imported at run
    time stay the real ones, and so that mypy, as for the real package (on
    PYTHONPATH or in site-packages), reports no errors of the pure-Python
    modules it follows there (only those of the modules checked)."""
    path = [] if stub_root is None else [str(stub_root)]
    if os.path.realpath(subproc.PKG_PARENT) not in _site_dirs():
        path.append(subproc.PKG_PARENT)
    env = subproc.env(MYPYPATH=os.pathsep.join(path)) if path else subproc.env()
    if stub_root is not None:
        env["PYTHONPATH"] += os.pathsep + str(stub_root)
    return env


def run(args, tmp_path, env):
    p = subprocess.run([sys.executable, "-m", *args], cwd=subproc.CWD, env=env,
                       capture_output=True, text=True, timeout=900)
    return p.returncode, p.stdout + p.stderr


def stubtest(modules, tmp_path, stub_root=None):
    cfg = tmp_path / "stubtest.ini"
    cfg.write_text(f"[mypy]\ncache_dir = {tmp_path / 'cache'}\n")
    return run(["mypy.stubtest", *modules, "--concise", "--allowlist", str(ALLOWLIST),
                "--mypy-config-file", str(cfg)], tmp_path, mypy_env(stub_root))


def test_every_compiled_module_has_a_stub_and_the_package_is_typed():
    mods = extension_modules()
    assert "mlxcy.core" in mods and "mlxcy.generation.engine" in mods, mods
    missing = [m for m in mods if not (PKG.parent / (m.replace(".", "/") + ".pyi")).is_file()]
    assert not missing, f"compiled modules without a .pyi stub: {missing}"
    assert (PKG / "py.typed").is_file()


def test_stubtest_finds_no_difference(tmp_path):
    rc, out = stubtest(extension_modules(), tmp_path)
    assert rc == 0, out
    assert "error" not in out.lower(), out


def test_stubtest_fails_on_a_wrong_stub(tmp_path):
    """A copy of the package's Python files and stubs with mlxcy.random's
    stub broken twice (a renamed parameter, a missing function), searched
    before the real ones: stubtest must report exactly those two."""
    root = tmp_path / "stubs"
    for f in PKG.rglob("*"):
        if f.suffix in (".py", ".pyi") or f.name == "py.typed":
            dst = root / f.relative_to(PKG.parent)
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(f, dst)
    stub = root / "mlxcy" / "random.pyi"
    text = stub.read_text()
    broken = text.replace("def split(key: _ArrayLike, num: int = 2)",
                          "def split(key: _ArrayLike, n: int = 2)")
    broken = re.sub(r"def gumbel\(.*\) -> Array: \.\.\.\n", "", broken)
    assert broken.count("n: int = 2)") == 1 and "def gumbel" not in broken
    stub.write_text(broken)
    rc, out = stubtest(["mlxcy.random"], tmp_path, stub_root=root)
    assert rc != 0, out
    errors = [line for line in out.splitlines() if line and not line.startswith("note:")]
    assert errors == [
        'mlxcy.random.gumbel is not present in stub',
        'mlxcy.random.split is inconsistent, stub parameter "n" differs from runtime '
        'parameter "num"',
    ], out


MYPY_INI = """\
[mypy]
strict = True
cache_dir = {cache}
# Check the scripts against mlxcy's stubs and annotations; third-party
# packages that mlxcy's pure-Python modules import are not analysed (Any),
# and errors inside mlxcy itself are not the scripts' (as for any installed
# package).
follow_imports = skip

[mypy-mlxcy.*]
follow_imports = silent

[mypy-numpy.*]
follow_imports = silent
"""


def mypy_scripts(tmp_path, *names):
    cfg = tmp_path / "mypy.ini"
    cfg.write_text(MYPY_INI.format(cache=tmp_path / "cache"))
    paths = [str(HERE / "typecheck" / n) for n in names]
    return run(["mypy", "--config-file", str(cfg), "--show-error-codes", "--no-pretty",
                *paths], tmp_path, mypy_env())


def test_user_script_typechecks_against_the_stubs(tmp_path):
    rc, out = mypy_scripts(tmp_path, "user_api.py")
    assert rc == 0 and "Success: no issues found in 1 source file" in out, out


def test_misuses_of_the_api_are_type_errors(tmp_path):
    src = (HERE / "typecheck" / "bad_api.py").read_text().splitlines()
    want = {(i, m.group(1)) for i, line in enumerate(src, 1)
            if (m := re.search(r"# E: ([\w-]+)$", line))}
    assert len(want) >= 10
    rc, out = mypy_scripts(tmp_path, "bad_api.py")
    got = set()
    for line in out.splitlines():
        m = re.match(r".*bad_api\.py:(\d+): error: .*\[([\w-]+)\]$", line)
        if m:
            got.add((int(m.group(1)), m.group(2)))
    assert rc == 1, out
    assert got == want, f"missing {sorted(want - got)}, unexpected {sorted(got - want)}\n{out}"
