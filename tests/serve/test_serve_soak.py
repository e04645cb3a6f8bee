"""A short soak of `mlxcy serve` (benchmarks/soak_serve.py with small counts,
against a tiny random-weight Qwen3): concurrent sessions that stream, cancel
mid-stream, drop connections before the reply, send bad requests and chat
over several turns.  Every request must get a complete reply or a clean
error, none may hang, the server must go idle, and MLX active memory outside
the prefix cache must come back to where it was (no leaked rows or caches)."""
import sys
from pathlib import Path

import pytest

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")
pytest.importorskip("llguidance")
pytest.importorskip("transformers")

import serve_helpers as H  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import soak_serve  # noqa: E402


def test_short_soak(tmp_path):
    H.make_tiny_qwen3(tmp_path)
    worker, live = H.start(tmp_path, max_batch=8, max_queue=12, kv_budget=2 << 20)
    try:
        H.request(live.port, "POST", "/v1/completions",
                  {"model": "tiny", "prompt": "warm up", "max_tokens": 4})
        soak = soak_serve.Soak(live.url, "tiny", sessions=6, seed=3, timeout=90, max_tokens=12)
        cleared = []

        def reset():           # empty the prefix cache: then MLX memory must come back
            cleared.append(worker.call(lambda: (worker.prefix.bytes, worker.prefix.clear())[0]))
        rep = soak.run(actions=10, sample_every=1.0, tolerance_mb=0.01, reset=reset)
        assert rep["ok"], rep["failures"]
        counts = rep["counts"]
        assert rep["requests"] == 6 * 10
        for key in ("chat:ok", "cancel:cancelled", "drop:dropped", "bad:refused"):
            assert counts.get(key, 0) > 0, counts
        assert not any(k.endswith((":hang", ":failed")) for k in counts)
        assert rep["cached_tokens"] > 0 and worker.prefix.hits > 0
        assert 0 < cleared[1] <= worker.prefix.budget
        assert worker.live == 0 and worker.num_running == 0
        assert rep["samples"] and rep["after"]["running"] == 0
    finally:
        live.stop()
        worker.close()
