"""`mlxcy serve`: an OpenAI-compatible HTTP server over mlxcy's generation engine.

    mlxcy serve --model PATH [--host 127.0.0.1] [--port 8080] [--max-batch 32]
                [--max-queue 256] [--kv-budget BYTES] [--api-key KEY]
                [--prompt-lookup [K] | --draft-model PATH [--num-draft 4]] [--kv-bits B]

From Python:

    from mlxcy.serve import Worker, create_app
    worker = Worker(path, max_batch=32).start()     # loads the model on its thread
    app = create_app(worker)                         # a Starlette (ASGI) app
    uvicorn.run(app, host="127.0.0.1", port=8080)

Needs the `serve` extra: pip install "mlxcy[serve]".
"""
from __future__ import annotations

__all__ = ["Worker", "create_app", "serve", "add_parser"]


def __getattr__(name):
    if name == "Worker":
        from .worker import Worker
        return Worker
    if name == "create_app":
        from .app import create_app
        return create_app
    raise AttributeError(name)


def _missing(e):
    return SystemExit(f"mlxcy serve needs the 'serve' extra ({e.name} is not installed): "
                      f"pip install 'mlxcy[serve]'")


def serve(model, host="127.0.0.1", port=8080, max_batch=32, max_queue=256,
          kv_budget=1 << 30, api_key=None, model_id=None, dtype=None, log_level="info",
          prefill_chunk=None, prompt_lookup=None, draft_model=None, num_draft=4, kv_bits=None,
          kv_group_size=64, prefix_min_tokens=None):
    """Load `model` and serve it until interrupted."""
    if type(port) is not int or not 0 <= port <= 65535:   # (checked before the model loads)
        raise ValueError(f"port: must be an int in [0, 65535], got {port!r}")
    try:
        import uvicorn
        from .app import create_app
        from .metrics import Metrics
        from .worker import Worker
    except ImportError as e:
        raise _missing(e) from None
    metrics = Metrics()
    worker = Worker(model, max_batch=max_batch, max_queue=max_queue, kv_budget=kv_budget,
                    metrics=metrics, dtype=dtype, prefill_chunk=prefill_chunk,
                    prompt_lookup=prompt_lookup, draft_model=draft_model, num_draft=num_draft,
                    kv_bits=kv_bits, kv_group_size=kv_group_size,
                    prefix_min_tokens=prefix_min_tokens).start()
    try:
        app = create_app(worker, model_id=model_id, api_key=api_key)
        uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5)
    finally:
        worker.close()


def _bytes(s: str) -> int:
    """'1073741824', '512M', '2G', '0' -> bytes."""
    s = s.strip().upper().removesuffix("B").removesuffix("I")
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}.get(s[-1:], 1)
    if mult != 1:
        s = s[:-1]
    try:
        v = float(s) * mult
    except ValueError:
        raise ValueError(f"--kv-budget: expected bytes such as 1073741824, 512M or 2G, "
                         f"got {s!r}") from None
    if v < 0:
        raise ValueError("--kv-budget: must be >= 0")
    return int(v)


def add_parser(sub, default_model, **kw):
    """Add the `serve` subcommand to mlxcy's argparse subparsers."""
    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server (needs mlxcy[serve])",
                       description="Serve a model over an OpenAI-compatible HTTP API, with a "
                                   "chat page at / (needs the serve extra: "
                                   "pip install 'mlxcy[serve]').", **kw)
    p.add_argument("--model", "-m", help="model directory or .gguf file "
                                         "(default: SmolLM2-135M-Instruct)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default loopback)")
    p.add_argument("--port", type=int, default=8080, help="TCP port")
    p.add_argument("--max-batch", type=int, default=32, help="sequences decoded together")
    p.add_argument("--max-queue", type=int, default=256,
                   help="sequences waiting beyond the batch before requests get 429")
    p.add_argument("--kv-budget", type=_bytes, default=1 << 30,
                   help="bytes of KV cache the prefix cache may keep (0: off; 512M, 2G ...)")
    p.add_argument("--prefix-min-tokens", type=int, default=None, metavar="N",
                   help="shortest cached prefix a request reuses (default: 16 on the CPU, "
                        "128 on a GPU, where copying a cache costs more than prefilling a "
                        "few tokens)")
    p.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' on API requests")
    p.add_argument("--model-id", default=None, help="the name clients use (default: file name)")
    p.add_argument("--dtype", default=None, choices=("float32", "bfloat16", "float16"),
                   help="load in this dtype (default: the checkpoint's)")
    p.add_argument("--prefill-chunk", type=int, default=None,
                   help="prompt tokens prefilled per engine step, interleaved with decoding "
                        "(default: the device's)")
    p.add_argument("--prompt-lookup", nargs="?", type=int, const=True, default=None, metavar="K",
                   help="speculative decoding by prompt lookup: every sequence proposes up to "
                        "K tokens (default 15) copied from its prompt/history, verified in one "
                        "step; greedy output is unchanged")
    p.add_argument("--draft-model", default=None, metavar="PATH",
                   help="speculative decoding with this draft model (same tokenizer)")
    p.add_argument("--num-draft", type=int, default=4,
                   help="tokens the draft model proposes per step (with --draft-model)")
    p.add_argument("--kv-bits", type=int, default=None, choices=(2, 3, 4, 5, 6, 8),
                   help="quantize the KV cache (and the prefix cache) to this many bits")
    p.add_argument("--kv-group-size", type=int, default=64, choices=(32, 64, 128),
                   help="elements per scale and bias of the quantized KV cache")
    p.add_argument("--log-level", default="info",
                   choices=("critical", "error", "warning", "info", "debug"),
                   help="uvicorn's log level")

    def run(args):
        from pathlib import Path
        if args.draft_model is not None and not Path(args.draft_model).exists():
            raise SystemExit(f"--draft-model {args.draft_model}: no such model file or directory")
        if args.prompt_lookup is not None and args.draft_model is not None:
            raise SystemExit("--prompt-lookup and --draft-model are alternatives: give one")
        if args.prompt_lookup is not None and args.prompt_lookup < 1:
            raise SystemExit(f"--prompt-lookup: K must be >= 1, got {args.prompt_lookup}")
        if args.num_draft < 1:
            raise SystemExit(f"--num-draft: must be >= 1, got {args.num_draft}")
        if args.prefix_min_tokens is not None and args.prefix_min_tokens < 1:
            raise SystemExit(f"--prefix-min-tokens: must be >= 1, got {args.prefix_min_tokens}")
        serve(args.model or str(default_model()), host=args.host, port=args.port,
              max_batch=args.max_batch, max_queue=args.max_queue, kv_budget=args.kv_budget,
              api_key=args.api_key, model_id=args.model_id, dtype=args.dtype,
              log_level=args.log_level, prefill_chunk=args.prefill_chunk,
              prompt_lookup=args.prompt_lookup, draft_model=args.draft_model,
              num_draft=args.num_draft, kv_bits=args.kv_bits, kv_group_size=args.kv_group_size,
              prefix_min_tokens=args.prefix_min_tokens)
        return 0
    p.set_defaults(fn=run)
    return p
