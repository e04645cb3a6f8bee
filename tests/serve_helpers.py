"""A live `mlxcy serve` on 127.0.0.1 (a free port) for the serve tests: a tiny
random-weight Qwen3 with the real Qwen3 tokenizer and chat template (so tool
calls and JSON can be spelled), uvicorn on a background thread."""
from __future__ import annotations

import http.client
import json
import shutil
import socket
import threading
import time


def make_tiny_qwen3(d, head_dim=16):
    import torch
    import transformers
    from mlxcy import assets
    cfg = transformers.Qwen3Config(
        vocab_size=151936, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=head_dim, max_position_embeddings=2048,
        rope_theta=10000.0, tie_word_embeddings=True, rms_norm_eps=1e-6)
    torch.manual_seed(0)
    model = transformers.Qwen3ForCausalLM(cfg).eval()
    with torch.no_grad():   # a wider logit spread: fewer near-ties in greedy decoding
        model.model.embed_tokens.weight.mul_(8.0)
    model.save_pretrained(d, safe_serialization=True)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(assets.qwen3_tokenizer_dir() / f, d / f)
    return model


def free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


class LiveServer:
    """uvicorn serving `app` on a thread; .url, .port, .stop()."""

    def __init__(self, app):
        import uvicorn
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cfg = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning",
                             timeout_graceful_shutdown=2)
        self.server = uvicorn.Server(cfg)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        t0 = time.time()
        while not self.server.started:
            if time.time() - t0 > 30 or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)

    def stop(self):
        self.server.should_exit = True
        self.thread.join(10)


def start(model_dir, *, api_key=None, model_id="tiny", worker=None, **worker_kw):
    from mlxcy.serve.app import create_app
    from mlxcy.serve.metrics import Metrics
    from mlxcy.serve.worker import Worker
    if worker is None:
        worker = Worker(model_dir, metrics=Metrics(), dtype="float32", **worker_kw).start()
    app = create_app(worker, model_id=model_id, api_key=api_key)
    return worker, LiveServer(app)


def request(port, method, path, body=None, headers=None, raw=None, timeout=60):
    """(status, headers dict, parsed JSON or text) over a fresh connection."""
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    h = {"Content-Type": "application/json"}
    h.update(headers or {})
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    c.request(method, path, body=data, headers=h)
    r = c.getresponse()
    text = r.read().decode("utf-8", "replace")
    c.close()
    try:
        parsed = json.loads(text)
    except ValueError:
        parsed = text
    return r.status, {k.lower(): v for k, v in r.getheaders()}, parsed


def sse_events(port, path, body, headers=None, timeout=120):
    """The `data:` payloads of a streamed response, in order (JSON, or "[DONE]")."""
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    h = {"Content-Type": "application/json"}
    h.update(headers or {})
    c.request("POST", path, body=json.dumps(body).encode(), headers=h)
    r = c.getresponse()
    assert r.status == 200, (r.status, r.read())
    assert r.getheader("content-type").startswith("text/event-stream")
    text = r.read().decode()
    c.close()
    out = []
    for block in text.split("\n\n"):
        if not block.strip():
            continue
        assert block.startswith("data: "), block
        payload = block[len("data: "):]
        out.append(payload if payload == "[DONE]" else json.loads(payload))
    return out


def metric(port, name, **labels):
    """A sample's value from /metrics, read with prometheus_client's parser."""
    from prometheus_client.parser import text_string_to_metric_families
    text = request(port, "GET", "/metrics")[2]
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == name and s.labels == labels:
                return s.value
    raise KeyError(f"{name} {labels} not in /metrics")
