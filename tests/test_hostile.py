"""A battery of hostile inputs (tests/hostile_cases.py): each must raise the
documented mlxcy exception class with a message naming the file and the
tensor, key, field or argument at fault -- no signal, no hang, no wrong class.

The cases run in a worker process (started once, restarted after a death), so
a segfault or an abort fails its case instead of killing pytest."""
import json
import os
import re
import select
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from hostile_cases import CASES, CONFIG_CASES  # noqa: E402

TIMEOUT = 120


class Worker:
    def __init__(self):
        self.proc = None

    def start(self):
        env = dict(os.environ, PYTHONPATH=str(HERE.parent) + os.pathsep +
                   os.environ.get("PYTHONPATH", ""))
        self.proc = subprocess.Popen([sys.executable, "-u", str(HERE / "hostile_cases.py")],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.DEVNULL, text=True, env=env)
        assert self.readline(TIMEOUT) == "ready"

    def readline(self, timeout):
        r, _, _ = select.select([self.proc.stdout], [], [], timeout)
        return self.proc.stdout.readline().strip() if r else None

    def run(self, name):
        if self.proc is None or self.proc.poll() is not None:
            self.start()
        self.proc.stdin.write(name + "\n")
        self.proc.stdin.flush()
        line = self.readline(TIMEOUT)
        if line is None:
            self.stop()
            pytest.fail(f"{name}: no answer in {TIMEOUT} s (hang)")
        if line == "":
            rc = self.proc.wait()
            self.proc = None
            pytest.fail(f"{name}: the process died (exit status {rc}: a signal is negative)")
        return json.loads(line)

    def stop(self):
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None


@pytest.fixture(scope="module")
def worker():
    w = Worker()
    yield w
    w.stop()


@pytest.mark.parametrize("name", list(CASES))
def test_hostile(worker, name):
    _, expected, pattern = CASES[name]
    r = worker.run(name)
    assert r["raised"] is not None, f"{name}: accepted silently"
    assert expected in r["raised"], f"{name}: raised {r['raised'][0]}: {r['msg']}\n{r['tb']}"
    if expected not in ("IndexError", "MemoryError", "ValueError"):
        assert "Error" in r["raised"], f"{name}: {r['raised'][0]} is not an mlxcy.Error"
    assert re.search(pattern, r["msg"], re.S), f"{name}: message {r['msg']!r} lacks {pattern!r}"


def test_battery_size():
    assert len(CASES) - len(CONFIG_CASES) >= 60
