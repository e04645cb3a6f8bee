"""`mlxcy launch -n N [--backend ring] -- COMMAND...`: N local ranks of a
command over MLX's ring backend, as `mlx.launch --hosts 127.0.0.1 ...` does
on one machine: a JSON hostfile of free 127.0.0.1 ports in MLX_HOSTFILE,
MLX_RANK per process.  Output lines are prefixed with the rank (except rank
0's stdout, passed through).  When a rank fails (non-zero exit or a signal)
the others are stopped at once and the launcher exits with that rank's code,
naming it; a run that exceeds --timeout is stopped the same way.  For
several machines use mlx.launch (the mlx wheel's launcher: ssh, hostfiles,
NCCL) with the same command."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time


def free_ports(n):
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _pump(src, dst, prefix):
    for line in iter(src.readline, b""):
        dst.buffer.write(prefix + line if prefix else line)
        dst.flush()
    src.close()


def run(n, command, backend="ring", timeout=None, env=None, stdout=None, stderr=None,
        python=None):
    """Run `command` (argv list) as n ranks; returns (exit_code, message):
    0 and "" when every rank succeeded, else the first failing rank's code
    (124 for the timeout) and a message naming it."""
    if n < 1:
        raise ValueError(f"launch: need at least 1 rank, got {n}")
    if backend != "ring":
        raise ValueError(f"launch: only the ring backend runs locally (got {backend!r}); "
                         "use mlx.launch for nccl/mpi/jaccl")
    if python and command and command[0].endswith(".py"):
        command = [python] + list(command)
    stdout = stdout or sys.stdout
    stderr = stderr or sys.stderr
    ports = free_ports(n)
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump([[f"127.0.0.1:{p}"] for p in ports], f)
        hostfile = f.name
    procs, pumps = [], []
    try:
        for r in range(n):
            e = dict(os.environ if env is None else env, MLX_RANK=str(r))
            if n > 1:
                e["MLX_HOSTFILE"] = hostfile
            p = subprocess.Popen(command, env=e, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                 start_new_session=True)
            procs.append(p)
            for src, dst, pre in ((p.stdout, stdout, b"" if r == 0 else f"[{r}] ".encode()),
                                  (p.stderr, stderr, f"[{r}] ".encode())):
                t = threading.Thread(target=_pump, args=(src, dst, pre), daemon=True)
                t.start()
                pumps.append(t)
        # one waiter per rank records the order the ranks end in: when one dies, its
        # peers fail soon after ("connection lost"), often within one poll of it
        ended = []
        for r, p in enumerate(procs):
            threading.Thread(target=lambda r=r, p=p: (p.wait(), ended.append(r)),
                             daemon=True).start()
        t0 = time.monotonic()
        code, msg = 0, ""
        while True:
            bad = [(r, procs[r].returncode) for r in list(ended) if procs[r].returncode != 0]
            if bad:
                r, c = bad[0]
                how = f"was killed by signal {-c}" if c < 0 else f"exited with code {c}"
                code, msg = (c if c > 0 else 128 - c), f"mlxcy launch: rank {r} {how}; " \
                    "stopping the other ranks"
                break
            if len(ended) == len(procs):
                break
            if timeout is not None and time.monotonic() - t0 > timeout:
                code, msg = 124, f"mlxcy launch: the run exceeded {timeout:g} s; stopping it"
                break
            time.sleep(0.05)
        if code:
            _stop(procs)
        for t in pumps:
            t.join(timeout=5)
        return code, msg
    finally:
        _stop(procs)
        os.unlink(hostfile)


def _stop(procs):
    for p in procs:
        if p.poll() is None:
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
    deadline = time.monotonic() + 3
    for p in procs:
        try:
            p.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            p.wait()


def main(argv=None):
    import argparse
    ap = argparse.ArgumentParser(prog="mlxcy launch", description=__doc__.split("\n\n")[0])
    ap.add_argument("-n", type=int, default=2, help="number of ranks (default 2)")
    ap.add_argument("--backend", default="ring")
    ap.add_argument("--timeout", type=float, default=None, help="stop the run after this many s")
    ap.add_argument("command", nargs=argparse.REMAINDER,
                    help="the command; `mlxcy ...` runs this Python's mlxcy CLI")
    a = ap.parse_args(argv)
    cmd = a.command[1:] if a.command[:1] == ["--"] else a.command
    if not cmd:
        ap.error("missing the command to run")
    if cmd[0] == "mlxcy":
        cmd = [sys.executable, "-m", "mlxcy"] + cmd[1:]
    elif cmd[0].endswith(".py"):
        cmd = [sys.executable] + cmd
    code, msg = run(a.n, cmd, a.backend, a.timeout)
    if msg:
        print(msg, file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
