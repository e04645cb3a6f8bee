"""How tests start Python subprocesses so that they import the mlxcy under test.

CI installs the package (its compiled modules live in site-packages) and runs
pytest from the checkout, whose source tree has none; a developer builds in
place.  A child therefore gets the folder this process imported mlxcy from
first on PYTHONPATH, and runs outside the checkout: `python -c` and
`python -m` put their working folder first on sys.path, ahead of PYTHONPATH.
"""
import importlib.util
import os
import tempfile

PKG_PARENT = os.path.dirname(os.path.dirname(importlib.util.find_spec("mlxcy").origin))
CWD = tempfile.gettempdir()


def env(**extra):
    """os.environ with PKG_PARENT first on PYTHONPATH and `extra` (stringified) set."""
    path = [PKG_PARENT] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    e = dict(os.environ, PYTHONPATH=os.pathsep.join(path))
    e.update({k: str(v) for k, v in extra.items()})
    return e
