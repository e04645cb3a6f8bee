"""mlxcy's import graph: no module imports itself through others (no cycle),
and no layer imports a layer above it (docs/internals.md's map).

Every import counts, lazy ones inside functions too: `import` and `from`
statements of the .py files (parsed with ast), and `import`/`cimport`
statements of the .pyx/.pxd files (strings and comments stripped first, as
Cython's own dependency scan does).  A module's .pyx and .pxd are one node;
`from pkg import name` is an edge to pkg.name when that is a module, else to
pkg (its __init__)."""
import ast
import re
from pathlib import Path

import mlxcy

PKG = Path(mlxcy.__file__).resolve().parent

# Layers from the bottom: a module may import modules of its own layer and
# the layers below.  Keys: first component below mlxcy (a top-level module
# or a subpackage).  mlxcy/__init__.py and __main__.py, the package's front
# door that imports from every layer, are on the top layer with the CLI.
LAYERS = [
    # the array layer, and the utilities it and everything else use
    {"core", "ops", "fast", "random", "transforms", "io", "device", "memory", "cpu_kernels",
     "native", "errors", "json_files", "gguf_reader", "safetensors_header", "tuning",
     "_progress", "assets"},
    {"tokenizer", "nn"},
    {"models", "chat"},
    {"distributed", "train"},
    {"generation", "backends"},
    {"serve"},
    {"cli"},
]
FRONT = {"mlxcy", "mlxcy.__main__"}


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


_CY_STMT = re.compile(r"^[ \t]*(?:from[ \t]+(\.*[\w.]*)[ \t]+c?import[ \t]+(\([^)]*\)|[^\n]*)"
                      r"|c?import[ \t]+([^\n]*))", re.M)


def _imports_py(text, name, is_pkg):
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.Import):
            for a in node.names:
                yield a.name, []
        elif isinstance(node, ast.ImportFrom):
            yield _absolute(node.module or "", node.level, name, is_pkg), \
                [a.name for a in node.names]


def _imports_cy(text, name, is_pkg):
    from Cython.Build.Dependencies import strip_string_literals
    code, _ = strip_string_literals(text)
    code = re.sub(r"#[^\n]*", "", code)
    for m in _CY_STMT.finditer(code):
        if m.group(1) is not None:
            frm = m.group(1)
            level = len(frm) - len(frm.lstrip("."))
            names = [n.split()[0] for n in m.group(2).strip("()").replace("\n", " ").split(",")
                     if n.strip()]
            yield _absolute(frm.lstrip("."), level, name, is_pkg), names
        else:
            for n in m.group(3).split(","):
                if n.strip():
                    yield n.split()[0], []


def _absolute(module, level, name, is_pkg):
    if not level:
        return module
    base = name.split(".") if is_pkg else name.split(".")[:-1]
    base = base[:len(base) - (level - 1)]
    return ".".join(base + ([module] if module else []))


def import_graph(root: Path) -> dict:
    """module -> set of the package's modules it imports (root: the package folder)."""
    files = [p for p in root.rglob("*") if p.suffix in (".py", ".pyx", ".pxd")
             and "include" not in p.relative_to(root).parts]
    mods = {module_name(p, root) for p in files}
    graph = {m: set() for m in mods}
    for p in files:
        me = module_name(p, root)
        scan = _imports_py if p.suffix == ".py" else _imports_cy
        for target, names in scan(p.read_text(encoding="utf-8"), me, p.stem == "__init__"):
            for t in ([f"{target}.{n}" if f"{target}.{n}" in mods else target for n in names]
                      or [target]):
                while t and t not in mods:          # the nearest module that exists
                    t = t.rpartition(".")[0]
                if t and t != me:
                    graph[me].add(t)
    return graph


def find_cycle(graph: dict):
    """One cycle as a list of modules [a, b, ..., a], or None."""
    state, stack = {}, []

    def visit(v):
        state[v] = 1
        stack.append(v)
        for w in sorted(graph.get(v, ())):
            if state.get(w) == 1:
                return stack[stack.index(w):] + [w]
            if w not in state:
                found = visit(w)
                if found:
                    return found
        stack.pop()
        state[v] = 2
        return None

    for v in sorted(graph):
        if v not in state:
            found = visit(v)
            if found:
                return found
    return None


def layer_of(module: str):
    if module in FRONT:
        return len(LAYERS) - 1
    key = module.split(".")[1]
    for i, layer in enumerate(LAYERS):
        if key in layer:
            return i
    raise KeyError(module)


def upward_imports(graph: dict) -> list:
    return sorted(f"{a} (layer {layer_of(a)}) imports {b} (layer {layer_of(b)})"
                  for a, bs in graph.items() for b in bs if layer_of(b) > layer_of(a))


def test_mlxcy_has_no_import_cycle():
    graph = import_graph(PKG)
    assert len(graph) > 60 and "mlxcy.generation.engine" in graph
    assert {"mlxcy.models.cache", "mlxcy.core"} <= graph["mlxcy.generation.engine"]
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_every_module_has_a_layer_and_imports_none_above_it():
    graph = import_graph(PKG)
    for m in graph:
        layer_of(m)        # a new top-level module or subpackage needs a place in LAYERS
    assert upward_imports(graph) == []


def _write(root: Path, files: dict):
    for rel, text in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)


def test_the_check_finds_lazy_relative_and_cython_cycles(tmp_path):
    pkg = tmp_path / "mlxcy"
    _write(pkg, {
        "__init__.py": "",
        "core.pxd": "from mlxcy.native cimport array as na\n",
        "core.pyx": '"""from mlxcy.generation import engine  (a docstring, not an import)"""\n'
                    "# from mlxcy.models import base  (a comment)\n",
        "native/__init__.pxd": "", "native/array.pxd": "",
        "models/__init__.py": "", "models/cache.pyx": "from mlxcy.core cimport Array\n",
        "generation/__init__.py": "",
        "generation/engine.pyx": "from mlxcy.models.cache cimport (\n    Cache)\n",
        "generation/api.py": "def f():\n    from .inference import load\n",
        "generation/inference.py": "from mlxcy.generation import api\n",
    })
    g = import_graph(pkg)
    assert g["mlxcy.core"] == {"mlxcy.native.array"}
    assert g["mlxcy.generation.engine"] == {"mlxcy.models.cache"}
    assert g["mlxcy.generation.api"] == {"mlxcy.generation.inference"}
    cycle = find_cycle(g)
    assert cycle is not None and set(cycle) == {"mlxcy.generation.api",
                                                "mlxcy.generation.inference"}
    # a cimport cycle through a .pxd
    _write(pkg, {"generation/api.py": "", "models/cache.pxd":
                 "from mlxcy.generation.engine cimport step\n"})
    g = import_graph(pkg)
    assert set(find_cycle(g)) == {"mlxcy.models.cache", "mlxcy.generation.engine"}
    assert "mlxcy.models.cache (layer 2) imports mlxcy.generation.engine (layer 4)" in \
        upward_imports(g)
