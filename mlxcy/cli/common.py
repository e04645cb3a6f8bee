"""What every `mlxcy` command shares: the user-error type, the check of an
output directory before long work, and `run`, which turns a command's
exceptions into one line on stderr and exit status 2."""
from __future__ import annotations

import os
import sys
from pathlib import Path

__all__ = ["UsageError", "check_output_dir", "run", "one_line", "add_dtype", "DTYPES"]

DTYPES = ("float32", "bfloat16", "float16")        # what --dtype takes


def add_dtype(p, help="load in this dtype (default: the checkpoint's)"):
    """A command's --dtype flag (float32, bfloat16 or float16; default: none)."""
    p.add_argument("--dtype", default=None, choices=DTYPES, help=help)


class UsageError(Exception):
    """A CLI-level user error (bad path, refused overwrite): one line, exit 2."""


def check_output_dir(path, what: str, force: bool = False, allow_existing: bool = False) -> Path:
    """Refuse an output directory before any long work: an existing file at
    `path`, an existing non-empty directory (unless force / allow_existing),
    or a place where no file can be written.  Creates nothing."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise UsageError(f"{what} {p}: exists and is not a directory")
    if p.is_dir() and any(p.iterdir()) and not (force or allow_existing):
        raise UsageError(f"{what} {p}: already exists and is not empty (use --force to "
                         f"overwrite it)")
    # the nearest existing ancestor must take a new file
    anc = p.absolute()
    while not anc.exists():
        if anc.parent == anc:
            break
        anc = anc.parent
    if not anc.is_dir():
        raise UsageError(f"{what} {p}: {anc} is not a directory")
    probe = anc / f".mlxcy-write-test-{os.getpid()}"
    try:
        with open(probe, "x"):
            pass
        probe.unlink()
    except OSError as e:
        raise UsageError(f"{what} {p}: cannot write in {anc} "
                         f"({e.strerror or type(e).__name__})") from None
    return p


def one_line(e: BaseException) -> str:
    """An exception as one line of text (a KeyError names its key)."""
    msg = " ".join(str(e).split())
    if isinstance(e, KeyError) and len(e.args) == 1:
        msg = f"missing key {e.args[0]!r}"
    return msg or type(e).__name__


def _quiet_stdout():
    """stdout's reader went away (`| head`): send the rest to /dev/null so the
    interpreter's final flush raises nothing."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError):
        pass


def run(args) -> int:
    """Run a parsed command: user errors -> one line on stderr, exit status 2."""
    from mlxcy.errors import Error
    user_errors = (Error, UsageError, OSError, ValueError, KeyError, TypeError, MemoryError,
                   FloatingPointError, RuntimeError)
    try:
        return args.fn(args) or 0
    except BrokenPipeError:
        _quiet_stdout()
        return 0
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except Exception as e:
        if os.environ.get("MLXCY_DEBUG"):
            raise
        if isinstance(e, user_errors):
            print(f"mlxcy {args.command}: error: {one_line(e)}", file=sys.stderr)
        else:
            print(f"mlxcy {args.command}: internal error: {type(e).__name__}: {one_line(e)} "
                  f"(MLXCY_DEBUG=1 shows the traceback)", file=sys.stderr)
        return 2
