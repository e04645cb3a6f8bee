"""Build mlxcy's extension modules against the installed `mlx` wheel.

MLX's C++ headers and libmlx.so come from the `mlx` package itself, found at
build time; each extension gets an rpath relative to its own location so the
installed package finds libmlx.so wherever site-packages is.
"""
import os
import re
import sys
from pathlib import Path

from setuptools import Extension, setup


def mlx_dirs():
    import importlib.util

    spec = importlib.util.find_spec("mlx")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("mlxcy: the `mlx` package must be installed before building "
                 "(pip install 'mlx[cpu]==0.32.4' or 'mlx[cuda13]==0.32.4')")
    root = Path(list(spec.submodule_search_locations)[0])
    inc, lib = root / "include", root / "lib"
    if not (inc / "mlx" / "mlx.h").exists() or not (lib / "libmlx.so").exists():
        sys.exit(f"mlxcy: {root} lacks include/mlx/mlx.h or lib/libmlx.so: install a backend "
                 "wheel, e.g. pip install 'mlx[cpu]==0.32.4'")
    return root, inc, lib


HEADER = re.compile(r'"(mlxcy/\w+\.h)"')
CIMPORT = re.compile(r"^[ \t]*(?:from[ \t]+(mlxcy[\w.]*)[ \t]+)?cimport[ \t]+(\([^)]*\)|[^\n#]+)",
                     re.M)


def header_depends(pyx: Path, here: Path) -> list[str]:
    """The include/mlxcy headers a module's C++ includes: those its .pyx and
    every .pxd it cimports (transitively) declare, and theirs.  build_ext
    recompiles the module when one is newer than it -- it looks at no header
    by itself, so an edited kernel (e.g. gpu_step.h's device code, a string
    compiled into mlxcy.models.base) would otherwise keep the old build."""
    sources, headers, todo = set(), set(), [pyx, pyx.with_suffix(".pxd")]
    while todo:
        f = todo.pop()
        if f in sources or not f.exists():
            continue
        sources.add(f)
        text = f.read_text()
        headers.update(HEADER.findall(text))
        for mod, names in CIMPORT.findall(text):   # (from mod) cimport a (as b), ...
            for n in names.strip("()").split(","):
                name = (n.split() or [""])[0]            # "a as b": a
                path = f"{mod}.{name}" if mod else name
                if path.startswith("mlxcy"):
                    todo.append(here.joinpath(*path.split(".")).with_suffix(".pxd"))
            if mod:
                todo.append(here.joinpath(*mod.split(".")).with_suffix(".pxd"))
    done = set()
    while headers:
        h = headers.pop()
        f = here / "include" / h
        if h in done or not f.exists():
            continue
        done.add(h)
        headers.update(HEADER.findall(f.read_text()))
    return sorted(str(here / "include" / h) for h in done)


def extensions():
    from Cython.Build import cythonize

    root, inc, lib = mlx_dirs()
    here = Path(__file__).parent
    pyx = sorted(p for p in (here / "mlxcy").rglob("*.pyx"))
    # MLXCY_MODULES=mlxcy.core,mlxcy.ops builds only those (developer speed-up).
    only = [m for m in os.environ.get("MLXCY_MODULES", "").split(",") if m]
    exts = []
    for p in pyx:
        rel = p.relative_to(here).with_suffix("")
        name = ".".join(rel.parts)
        if only and name not in only:
            continue
        depth = len(rel.parts) - 1  # package depth below site-packages
        rpath = "$ORIGIN/" + "/".join([".."] * depth) + "/mlx/lib"
        exts.append(Extension(
            name,
            [str(p.relative_to(here))],
            depends=header_depends(p, here),
            language="c++",
            include_dirs=[str(here / "include"), str(inc)],
            library_dirs=[str(lib)],
            libraries=["mlx"],
            # Relative rpath for an installed wheel; the build-time path for
            # in-place and editable builds.
            runtime_library_dirs=[rpath, str(lib)],
            extra_compile_args=["-std=c++20", "-O2", "-Wno-unused-function",
                                "-Wno-deprecated-declarations"],
            define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")],
        ))
    return cythonize(
        exts,
        compiler_directives={"language_level": "3", "cpp_locals": True},
        nthreads=int(os.environ.get("MLXCY_JOBS", "0")) or None,
    )


def ship_headers():
    """Copy include/mlxcy/*.h into the package, so mlxcy.get_include() finds
    them after a normal (non-editable) install."""
    here = Path(__file__).parent
    dst = here / "mlxcy" / "include" / "mlxcy"
    dst.mkdir(parents=True, exist_ok=True)
    for h in (here / "include" / "mlxcy").glob("*.h"):
        (dst / h.name).write_bytes(h.read_bytes())


ship_headers()
# Compile the extensions in parallel (pip's build runs build_ext without -j).
setup(ext_modules=extensions(),
      options={"build_ext": {"parallel": int(os.environ.get("MLXCY_JOBS") or os.cpu_count() or 1)}})
