"""Every code block in README.md and docs/*.md runs as written.

Blocks fenced as python, bash/sh/console or cython are extracted; each runs in
its own process from an empty folder (python: `python -c`; bash: `bash -e`,
with `mlxcy` on PATH; cython: compiled against mlxcy as another package
would).  A block is skipped only when the HTML comments just above its fence
include `<!-- snippet: needs-gpu ... -->` or `<!-- snippet: needs-network ... -->`
(the README documents the marker).  Plain ``` blocks are output, not code."""
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import subproc

ROOT = Path(__file__).resolve().parents[1]
FILES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LANGS = {"python": "python", "py": "python", "bash": "bash", "sh": "bash", "console": "bash",
         "shell": "bash", "cython": "cython", "pyx": "cython"}
MARKER = re.compile(r"<!--\s*snippet:\s*(needs-gpu|needs-network)\b")


def extract(text):
    """[(line number, language, code, skip reason or None)]"""
    lines = text.splitlines()
    out, i = [], 0
    while i < len(lines):
        m = re.match(r"^(\s*)```(\w+)?\s*$", lines[i])
        if not m:
            i += 1
            continue
        lang, start = (m.group(2) or "").lower(), i
        j = i + 1
        while j < len(lines) and not lines[j].strip().startswith("```"):
            j += 1
        code = textwrap.dedent("\n".join(lines[i + 1:j]))
        k, reason = start - 1, None
        while k >= 0 and lines[k].strip().startswith("<!--"):
            hit = MARKER.search(lines[k])
            if hit:
                reason = hit.group(1)
            k -= 1
        if lang in LANGS:
            out.append((start + 1, LANGS[lang], code, reason))
        i = j + 1
    return out


SNIPPETS = [(f.relative_to(ROOT).as_posix(), *s) for f in FILES for s in extract(f.read_text())]


def _env(tmp_path):
    env = subproc.env(MLXCY_PROGRESS="0")
    if shutil.which("mlxcy") is None:           # the in-place build has no console script
        bindir = tmp_path / ".bin"
        bindir.mkdir()
        shim = bindir / "mlxcy"
        shim.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m mlxcy "$@"\n')
        shim.chmod(0o755)
        env["PATH"] = f"{bindir}{os.pathsep}{env.get('PATH', '')}"
    return env


CYTHON_SETUP = textwrap.dedent('''
    import os, mlxcy
    from setuptools import Extension, setup
    from Cython.Build import cythonize
    pkg_root = os.path.dirname(os.path.dirname(mlxcy.__file__))
    libs = mlxcy.get_library_dirs()
    ext = Extension("snippet", ["snippet.pyx"], language="c++",
                    include_dirs=mlxcy.get_include(), library_dirs=libs, libraries=["mlx"],
                    runtime_library_dirs=libs, extra_compile_args=["-std=c++20", "-O0"])
    setup(ext_modules=cythonize([ext], include_path=[pkg_root], quiet=True),
          script_args=["build_ext", "--inplace", "-q"])
''')


def test_extraction_finds_the_blocks_and_markers():
    text = ("x\n<!-- snippet: needs-gpu -->\n<!-- other -->\n```bash\necho a\n```\n"
            "```python\nprint(1)\n```\n```\noutput\n```\n")
    assert extract(text) == [(4, "bash", "echo a", "needs-gpu"), (7, "python", "print(1)", None)]
    assert any(s[0] == "README.md" for s in SNIPPETS)


@pytest.mark.slow
@pytest.mark.parametrize("where,line,lang,code,reason", SNIPPETS,
                         ids=[f"{s[0]}:{s[1]}" for s in SNIPPETS])
def test_snippet_runs(where, line, lang, code, reason, tmp_path):
    if reason:
        pytest.skip(f"{where}:{line} is marked {reason}")
    env = _env(tmp_path)
    if lang == "python":
        cmd = [sys.executable, "-c", code]
    elif lang == "bash":
        cmd = ["bash", "-e", "-c", code]
    else:
        (tmp_path / "snippet.pyx").write_text(code)
        (tmp_path / "setup.py").write_text(CYTHON_SETUP)
        cmd = [sys.executable, "setup.py"]
    p = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, (f"{where}:{line} failed\n--- code\n{code}\n--- stdout\n"
                               f"{p.stdout[-3000:]}\n--- stderr\n{p.stderr[-3000:]}")
    if lang == "cython":
        sys.path.insert(0, str(tmp_path))
        try:
            r = subprocess.run([sys.executable, "-c", "import snippet"], cwd=tmp_path, env=env,
                               capture_output=True, text=True, timeout=120)
            assert r.returncode == 0, r.stderr
        finally:
            sys.path.remove(str(tmp_path))
