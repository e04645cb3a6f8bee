"""Progress bars for long work (model load, conversion, training, validation,
bench): tqdm on stderr, shown only when stderr is a terminal, so logs, pipes
and tests see plain lines.  MLXCY_PROGRESS=0 turns them off, =1 forces them."""
from __future__ import annotations

import contextlib
import os
import sys
import threading

__all__ = ["enabled", "bar", "spinner", "write"]


def enabled(stream=None) -> bool:
    env = os.environ.get("MLXCY_PROGRESS", "")
    if env in ("0", "1"):
        return env == "1"
    stream = sys.stderr if stream is None else stream
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


def bar(total=None, desc="", unit="it", leave=True, initial=0, show=True, **kw):
    """A tqdm bar on stderr (a no-op object when progress is off or not show)."""
    from tqdm import tqdm
    return tqdm(total=total, desc=desc, unit=unit, leave=leave, initial=initial,
                file=sys.stderr, disable=not (show and enabled()), dynamic_ncols=True, **kw)


def write(msg: str, file=None) -> None:
    """Print a line without breaking an active bar (tqdm.write when bars are on)."""
    file = sys.stdout if file is None else file
    if enabled():
        from tqdm import tqdm
        tqdm.write(msg, file=file)
    else:
        print(msg, file=file, flush=True)


@contextlib.contextmanager
def spinner(desc: str):
    """Elapsed time for one opaque call (a model load): a bar with no total,
    refreshed from a thread while the call runs."""
    if not enabled():
        yield
        return
    b = bar(total=None, desc=desc, bar_format="{desc} {elapsed}", leave=False)
    stop = threading.Event()

    def tick():
        while not stop.wait(0.2):
            b.refresh()

    t = threading.Thread(target=tick, daemon=True)
    t.start()
    try:
        yield
    finally:
        stop.set()
        t.join()
        b.close()
