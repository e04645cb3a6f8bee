"""The `mlxcy` command end to end on tiny models (mlxcy.cli.commands in process, or
a subprocess where the process itself matters: pipes, terminals).

generate is checked against transformers' greedy tokens, perplexity against a
torch log-softmax, bench against its own contract (both backends make exactly
the tokens asked for); the rest checks what the user sees: one-line errors,
refused overwrites, nothing written before a refusal, chat commands."""
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import subproc
from cli_models import make_cli_model, make_llama_gguf

from mlxcy.cli.commands import build_parser, main

TEXT = "the quick brown fox jumps over the lazy dog"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    make_cli_model(root / "model")
    make_llama_gguf(root / "model", root / "tiny.gguf")
    data = root / "data"
    data.mkdir()
    from cli_models import TEXT as PHRASE
    for split, n in (("train", 8), ("valid", 4)):
        (data / f"{split}.jsonl").write_text(
            "".join(json.dumps({"text": PHRASE}) + "\n" for _ in range(n)))
    return root


def _env():
    env = subproc.env(MLXCY_PROGRESS="")
    env.pop("MLXCY_DEBUG", None)
    return env


def _read_only_dir(tmp_path):
    """A folder no file can be created in (root ignores mode bits: use /sys)."""
    if os.geteuid() == 0:
        return Path("/sys/mlxcy-cli-test/out")
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    return ro / "out"


def _one_error_line(err, cmd):
    lines = [l for l in err.splitlines() if l.strip()]
    errs = [l for l in lines if l.startswith(f"mlxcy {cmd}: error:")]
    assert len(errs) == 1 and "Traceback" not in err, err
    return errs[0]


# ------------------------------------------------------------------ parser

def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    import mlxcy
    assert e.value.code == 0
    assert f"mlxcy {mlxcy.__version__}" in capsys.readouterr().out


def test_help_lists_every_command_and_every_option_has_help():
    p = build_parser()
    sub = next(a for a in p._actions if a.dest == "command")
    names = set(sub.choices)
    assert {"generate", "chat", "info", "discover", "convert", "bench", "perplexity",
            "lora", "fuse"} <= names
    for n in names:
        assert n in p.description
    for name, sp in sub.choices.items():
        for a in sp._actions:
            if a.dest == "help":
                continue
            assert a.help, f"mlxcy {name} {a.option_strings or a.dest}: no help line"
    text = sub.choices["generate"].format_help()
    assert "(default: 128)" in text and "--temperature" in text
    assert "(default: 100)" in sub.choices["lora"].format_help()


def test_cli_names_match_python_names():
    from mlxcy.generation.inference import GenerationOptions
    p = build_parser()
    a = p.parse_args(["generate", "x", "--temperature", "0.5", "--top-k", "3"])
    b = p.parse_args(["generate", "x", "--temp", "0.5", "--top-k", "3"])
    assert a.temperature == b.temperature == 0.5
    from mlxcy.cli.commands import _GEN_FLAGS
    assert set(_GEN_FLAGS) <= set(GenerationOptions.__dataclass_fields__)
    t = p.parse_args(["lora", "--model", "m", "--data", "d", "--schedule", "cosine"])
    assert t.lr_schedule == "cosine"


# ------------------------------------------------------------------ generate

def test_generate_matches_transformers_greedy(tiny, capsys):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    d = tiny / "model"
    assert main(["generate", "--model", str(d), "--raw", "--max-tokens", "12", TEXT]) == 0
    out = capsys.readouterr().out
    tok = AutoTokenizer.from_pretrained(str(d))
    ref = AutoModelForCausalLM.from_pretrained(str(d), dtype=torch.float32).eval()
    ids = tok(TEXT, return_tensors="pt").input_ids
    with torch.no_grad():
        g = ref.generate(ids, max_new_tokens=12, do_sample=False)
    assert out == tok.decode(g[0, ids.shape[1]:]) + "\n"


def test_generate_into_closed_pipe_is_quiet(tiny):
    r, w = os.pipe()
    os.close(r)                  # the reader (`| head -c 20`) is gone
    try:
        p = subprocess.run([sys.executable, "-m", "mlxcy", "generate", "--model",
                            str(tiny / "model"), "--raw", "--max-tokens", "50", TEXT],
                           stdout=w, stderr=subprocess.PIPE, env=_env(), cwd=subproc.CWD, timeout=300)
    finally:
        os.close(w)
    err = p.stderr.decode()
    assert p.returncode == 0, err
    assert "Traceback" not in err and "BrokenPipe" not in err and "Exception" not in err, err


def test_generate_errors_are_one_line(tiny, tmp_path, capsys):
    assert main(["generate", "--model", str(tmp_path / "nope"), "hi"]) == 2
    assert "nope" in _one_error_line(capsys.readouterr().err, "generate")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text("{not json")
    assert main(["generate", "--model", str(bad), "hi"]) == 2
    assert "config.json" in _one_error_line(capsys.readouterr().err, "generate")
    assert main(["generate", "--model", str(tiny / "model"), "--max-tokens", "-3", "hi"]) == 2
    err = capsys.readouterr().err
    assert "max_tokens" in _one_error_line(err, "generate")
    assert "loading" not in err                  # a bad flag fails before the model loads
    for cmd in ("generate", "chat"):
        assert main([cmd, "--model", str(tiny / "model"), "--temp", "nan"]
                    + (["hi"] if cmd == "generate" else [])) == 2
        err = capsys.readouterr().err
        assert "temperature" in _one_error_line(err, cmd) and "loading" not in err


# ------------------------------------------------------------------ chat

class _Stdout:
    """stdout for a chat run: records text; raises SIGINT (Ctrl-C) at the
    n-th write of the reply number `reply` (counted by the newlines closing them)."""

    def __init__(self, interrupt_reply=None, at=3):
        self.parts, self.interrupt_reply, self.at, self.writes = [], interrupt_reply, at, 0

    def write(self, s):
        self.parts.append(s)
        if self.interrupt_reply is not None and self.text().count("\n") == self.interrupt_reply:
            self.writes += 1
            if self.writes == self.at:
                signal.raise_signal(signal.SIGINT)
        return len(s)

    def flush(self):
        pass

    def isatty(self):
        return False

    def text(self):
        return "".join(self.parts)


def _chat(monkeypatch, capsys, args, lines, stdout=None):
    feed = iter(lines)

    def fake_input(prompt=""):
        try:
            return next(feed)
        except StopIteration:
            raise EOFError from None

    monkeypatch.setattr("builtins.input", fake_input)
    out = stdout or _Stdout()
    monkeypatch.setattr(sys, "stdout", out)
    rc = main(["chat", *args])
    monkeypatch.undo()
    return rc, out.text(), capsys.readouterr().err


def test_chat_turns_commands_and_save_load(tiny, tmp_path, monkeypatch, capsys):
    import mlxcy
    d = str(tiny / "model")
    saved = tmp_path / "s.json"
    rc, out, err = _chat(monkeypatch, capsys, ["--model", d, "--max-tokens", "6"],
                         ["hello there", "quick fox", f"/save {saved}", "/reset", "/bogus",
                          f"/load {saved}", "/system be brief", "/load /nonexistent/x.json"])
    assert rc == 0, err
    replies = out.split("\n")
    with mlxcy.load(d) as m:
        msgs = [{"role": "user", "content": "hello there"}]
        r1 = m.chat(msgs, max_tokens=6)
        msgs += [{"role": "assistant", "content": r1}, {"role": "user", "content": "quick fox"}]
        r2 = m.chat(msgs, max_tokens=6)      # the second turn sees the first
    assert replies[:2] == [r1, r2]
    data = json.loads(saved.read_text())
    assert [m["content"] for m in data["messages"]] == ["hello there", r1, "quick fox", r2]
    assert Path(str(saved) + ".kv.safetensors").is_file()
    assert "conversation reset" in err and "unknown command '/bogus'" in err
    assert "loaded 4 messages" in err and "with its KV cache" in err
    assert "system message set" in err
    assert "chat: error:" in err and "x.json" in err        # a bad /load keeps the chat


def test_chat_ctrl_c_stops_the_reply_and_keeps_the_chat(tiny, tmp_path, monkeypatch, capsys):
    d = str(tiny / "model")
    saved = tmp_path / "c.json"
    out = _Stdout(interrupt_reply=0, at=3)
    rc, text, err = _chat(monkeypatch, capsys, ["--model", d, "--max-tokens", "40"],
                          ["hello there", "quick fox", f"/save {saved}"], stdout=out)
    assert rc == 0, err
    assert "[reply stopped]" in err
    msgs = json.loads(saved.read_text())["messages"]
    assert [m["role"] for m in msgs] == ["user", "assistant", "user", "assistant"]
    first, second = text.split("\n")[:2]
    assert first == msgs[1]["content"] and second == msgs[3]["content"]
    import mlxcy
    with mlxcy.load(d) as m:
        full = m.chat(msgs[:1], max_tokens=40)
    assert full.startswith(first) and len(first) < len(full)      # cut short
    assert len(second) > len(first)                               # the next reply ran in full


# ------------------------------------------------------------------ info / discover

def test_info_and_discover(tiny, capsys):
    assert main(["info", str(tiny / "model")]) == 0
    info = json.loads(capsys.readouterr().out)
    cfg = json.loads((tiny / "model" / "config.json").read_text())
    assert info["vocab_size"] == cfg["vocab_size"]
    assert info["layers"] == cfg["num_hidden_layers"] and info["dtype"] == "float32"
    from transformers import AutoModelForCausalLM
    ref = AutoModelForCausalLM.from_pretrained(str(tiny / "model"))
    assert info["parameters"] == sum(p.numel() for p in ref.parameters())
    assert main(["discover", str(tiny)]) == 0
    found = json.dumps(json.loads(capsys.readouterr().out))
    assert str(tiny / "model") in found and "tiny.gguf" in found
    # the model as --model too, as in generate, chat and lora
    assert main(["info", "--model", str(tiny / "model")]) == 0
    assert json.loads(capsys.readouterr().out) == info
    with pytest.raises(SystemExit):
        main(["info", "-m", str(tiny / "model"), str(tiny / "tiny.gguf")])
    assert "two models given" in capsys.readouterr().err
    assert main(["discover", str(tiny / "nowhere")]) == 2
    assert "nowhere" in _one_error_line(capsys.readouterr().err, "discover")


def test_serve_refuses_a_port_out_of_range(capsys):
    assert main(["serve", "--port", "70000"]) == 2
    assert "port" in _one_error_line(capsys.readouterr().err, "serve")


# ------------------------------------------------------------------ convert

def test_convert_refuses_to_overwrite_and_checks_paths_first(tiny, tmp_path, capsys,
                                                             monkeypatch):
    src = str(tiny / "model")
    out = tmp_path / "q"
    assert main(["convert", src, str(out), "--bits", "8"]) == 0
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["quantization"]["bits"] == 8
    before = (out / "model.safetensors").stat().st_mtime_ns
    assert main(["convert", src, str(out), "--bits", "4"]) == 2
    assert "--force" in _one_error_line(capsys.readouterr().err, "convert")
    assert (out / "model.safetensors").stat().st_mtime_ns == before
    assert main(["convert", src, str(out), "--bits", "4", "--force"]) == 0
    assert json.loads((out / "config.json").read_text())["quantization"]["bits"] == 4
    capsys.readouterr()
    # an existing file, a read-only folder: refused before any conversion starts
    import mlxcy.models.convert as C
    monkeypatch.setattr(C, "convert_hf_to_mlx", lambda *a, **k: pytest.fail("converted"))
    f = tmp_path / "file"
    f.write_text("x")
    assert main(["convert", src, str(f)]) == 2
    assert "not a directory" in _one_error_line(capsys.readouterr().err, "convert")
    ro = _read_only_dir(tmp_path)
    assert main(["convert", src, str(ro)]) == 2
    assert "cannot write" in _one_error_line(capsys.readouterr().err, "convert")
    assert not ro.exists()


@pytest.mark.parametrize("bits", [4, 8])
def test_convert_gguf_honours_bits(tiny, tmp_path, capsys, bits):
    from mlxcy.models.load import load_model
    from tiny_models import rel
    g = tiny / "tiny.gguf"
    out = tmp_path / f"q{bits}"
    assert main(["convert", str(g), str(out), "--bits", str(bits), "--group-size", "32"]) == 0
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["quantization"] == {"group_size": 32, "bits": bits, "mode": "affine"}
    from safetensors import safe_open
    with safe_open(str(out / "model.safetensors"), "np") as f:
        assert f.get_tensor("model.layers.0.self_attn.q_proj.weight").dtype == np.uint32
    assert (out / "tokenizer.json").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".mlxcy-convert")]
    ids = np.array([[5, 17, 40, 3, 9, 60]], np.int32)
    with load_model(g, dtype="float32") as ref, load_model(out) as q:
        want = ref(ids).numpy()
        got = q(ids).numpy()
    assert rel(got, want) < (0.02 if bits == 8 else 0.2)
    # the quantized files are smaller than the float32 conversion
    f32 = tmp_path / "f32"
    assert main(["convert", str(g), str(f32)]) == 0
    assert (out / "model.safetensors").stat().st_size < \
        (f32 / "model.safetensors").stat().st_size * (0.4 if bits == 8 else 0.25)


# ------------------------------------------------------------------ lora / fuse

def test_lora_refuses_bad_adapter_path_before_training(tiny, tmp_path, capsys, monkeypatch):
    import mlxcy.train.trainer as T
    monkeypatch.setattr(T, "train", lambda *a, **k: pytest.fail("trained"))
    base = ["lora", "--model", str(tiny / "model"), "--data", str(tiny / "data"),
            "--iters", "2", "--batch-size", "2"]
    f = tmp_path / "file"
    f.write_text("x")
    assert main(base + ["--adapter-path", str(f)]) == 2
    assert "not a directory" in _one_error_line(capsys.readouterr().err, "lora")
    ro = _read_only_dir(tmp_path)
    assert main(base + ["--adapter-path", str(ro)]) == 2
    err = capsys.readouterr()
    assert "cannot write" in _one_error_line(err.err, "lora")
    assert "Trainable parameters" not in err.out
    # settings out of range fail before the model loads (a batch size or report interval
    # of 0 divided by zero, a NaN learning rate gave a NaN loss some iterations in)
    for flags, field in ((["--batch-size", "0"], "batch_size"),
                         (["--steps-per-report", "0"], "steps_per_report"),
                         (["--learning-rate", "nan"], "learning_rate"),
                         (["--max-seq-length", "1"], "max_seq_length"),
                         (["--clip-grad-norm", "-1"], "clip_grad_norm"),
                         (["--val-batches", "-2"], "val_batches")):
        assert main(base + flags + ["--adapter-path", str(tmp_path / "ad")]) == 2
        err = capsys.readouterr()
        assert field in _one_error_line(err.err, "lora") and "Loaded" not in err.out


def test_fuse_from_gguf_writes_a_tokenizer_and_refuses_overwrite(tiny, tmp_path, capsys):
    from tokenizers import Tokenizer as HFTokenizer
    from mlxcy.tokenizer import Tokenizer
    g = tiny / "tiny.gguf"
    ad = tmp_path / "ad"
    assert main(["lora", "--model", str(g), "--data", str(tiny / "data"), "--iters", "2",
                 "--batch-size", "2", "--num-layers", "1", "--adapter-path", str(ad)]) == 0
    fused = tmp_path / "fused"
    assert main(["fuse", "--model", str(g), "--adapter-path", str(ad),
                 "--save-path", str(fused)]) == 0
    assert (fused / "tokenizer.json").is_file()
    want = Tokenizer.load(g).encode(TEXT)
    assert Tokenizer.load(fused).encode(TEXT) == want
    assert HFTokenizer.from_file(str(fused / "tokenizer.json")).encode(
        TEXT, add_special_tokens=False).ids == want
    capsys.readouterr()
    assert main(["generate", "--model", str(fused), "--raw", "--max-tokens", "4", TEXT]) == 0
    assert capsys.readouterr().out.strip()
    assert main(["fuse", "--model", str(g), "--adapter-path", str(ad),
                 "--save-path", str(fused)]) == 2
    assert "--force" in _one_error_line(capsys.readouterr().err, "fuse")
    assert main(["fuse", "--model", str(g), "--adapter-path", str(tmp_path / "none"),
                 "--save-path", str(tmp_path / "f2")]) == 2
    assert "adapter_config.json" in _one_error_line(capsys.readouterr().err, "fuse")
    assert not (tmp_path / "f2").exists()


# ------------------------------------------------------------------ bench / perplexity

def test_bench_side_by_side(tiny, capsys):
    assert main(["bench", str(tiny / "model"), "--prompt-tokens", "16", "--gen-tokens", "5",
                 "--vs", "mlx-lm"]) == 0
    rows = [json.loads(l) for l in capsys.readouterr().out.splitlines()]
    assert [r.get("backend") for r in rows[:2]] == ["mlx", "mlx_lm"]
    assert all(r["generated"] == 5 and r["decode_tok_s"] > 0 for r in rows[:2])
    assert rows[2]["ratio_decode"] == pytest.approx(
        rows[0]["decode_tok_s"] / rows[1]["decode_tok_s"], rel=0.01)


def _torch_perplexity(d, ids, L):
    import torch
    from transformers import AutoModelForCausalLM
    ref = AutoModelForCausalLM.from_pretrained(str(d), dtype=torch.float32).eval()
    n = len(ids) // L
    x = torch.tensor(np.asarray(ids[: n * L]).reshape(n, L))
    with torch.no_grad():
        lp = torch.log_softmax(ref(x).logits[:, :-1].double(), -1)
    nll = -lp.gather(-1, x[:, 1:, None]).squeeze(-1).numpy().ravel()
    return float(np.exp(nll.mean())), nll.size


def test_perplexity_command_and_function_match_torch(tiny, tmp_path, capsys):
    from mlxcy.train.perplexity import perplexity
    from mlxcy.tokenizer import Tokenizer
    d = tiny / "model"
    f = tmp_path / "t.txt"
    f.write_text((TEXT + ". a mild breeze drifts past the old stone mill. ") * 6)
    ids = Tokenizer.load(d).encode(f.read_text(), add_special_tokens=True)
    want, n = _torch_perplexity(d, ids, 16)
    r = perplexity(d, f, sequence_length=16, batch_size=3)
    assert r.tokens == n and r.perplexity == pytest.approx(want, rel=1e-4)
    assert 0 < r.perplexity_stderr < r.perplexity
    assert main(["perplexity", str(d), "--data", str(f), "--sequence-length", "16"]) == 0
    assert f"Perplexity: {want:.3f}" in capsys.readouterr().out
    assert main(["perplexity", str(d), "--data", str(tmp_path / "none.txt")]) == 2
    assert "none.txt" in _one_error_line(capsys.readouterr().err, "perplexity")
    assert main(["perplexity", str(d), "--data", str(f), "--sequence-length", "1"]) == 2
    assert "sequence_length" in _one_error_line(capsys.readouterr().err, "perplexity")


# ------------------------------------------------------------------ progress bars

def _run_on_tty(args):
    """Run mlxcy with stderr on a pseudo-terminal; returns what the terminal got."""
    import fcntl
    import pty
    import struct
    import termios
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))
    p = subprocess.Popen([sys.executable, "-m", "mlxcy", *args], stdout=subprocess.DEVNULL,
                         stderr=slave, env=_env(), cwd=subproc.CWD)
    os.close(slave)
    chunks = []
    while True:
        try:
            b = os.read(master, 4096)
        except OSError:
            break
        if not b:
            break
        chunks.append(b)
    p.wait(timeout=300)
    os.close(master)
    return p.returncode, b"".join(chunks).decode(errors="replace")


def test_progress_bars_on_a_terminal_only(tiny, tmp_path):
    args = ["lora", "--model", str(tiny / "model"), "--data", str(tiny / "data"),
            "--iters", "3", "--batch-size", "2", "--steps-per-eval", "0", "--num-layers", "2",
            "--adapter-path", str(tmp_path / "ad")]
    rc, tty = _run_on_tty(args)
    assert rc == 0, tty
    assert "training" in tty and "3/3" in tty and "loss=" in tty and "tok_s=" in tty, tty
    assert "validating" in tty
    p = subprocess.run([sys.executable, "-m", "mlxcy", *args[:-1], str(tmp_path / "ad2")],
                       capture_output=True, text=True, env=_env(), cwd=subproc.CWD, timeout=300)
    assert p.returncode == 0, p.stderr
    assert "\r" not in p.stderr and "3/3" not in p.stderr
