"""Independent references for the tokenizer tests: Hugging Face `tokenizers`
objects built from the same files, and llama.cpp's test vectors."""
from __future__ import annotations

import io
import subprocess
import sys
import tarfile
from pathlib import Path

from mlxcy import assets
from mlxcy.gguf_reader import read_metadata

LLAMA_CPP_SDIST = "llama-cpp-python==0.3.36"


def hf_from_json(directory: Path):
    import tokenizers
    return tokenizers.Tokenizer.from_file(str(directory / "tokenizer.json"))


def hf_from_gguf(path: Path):
    """A `tokenizers` object from GGUF metadata, built as transformers' GGUF
    converter builds it (Gemma, Qwen2), or as SmolLM2's own tokenizer.json is
    (Digits + GPT-2 ByteLevel, which transformers does not map for `smollm`)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, AddedToken
    md = read_metadata(path)
    arch = md["general.architecture"]
    if md["tokenizer.ggml.model"] == "llama":
        from transformers.integrations.gguf.gguf_tokenizer_mapping import convert_gguf_tokenizer
        d = {"tokenizer_type": "llama", "tokens": md["tokenizer.ggml.tokens"],
             "scores": md.get("tokenizer.ggml.scores"),
             "token_type": md["tokenizer.ggml.token_type"]}
        tok, _ = convert_gguf_tokenizer(arch, d)
        return tok
    from transformers.integrations.gguf.gguf_tokenizer_mapping import _QWEN2_SPLIT  # noqa
    tokens = md["tokenizer.ggml.tokens"]
    vocab = {t: i for i, t in enumerate(tokens)}
    merges = [tuple(m.split(" ", 1)) for m in md["tokenizer.ggml.merges"]]
    tok = Tokenizer(models.BPE(vocab, merges))
    pre = md["tokenizer.ggml.pre"]
    if pre == "smollm":
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    elif pre == "qwen2":
        from tokenizers import Regex
        tok.normalizer = normalizers.NFC()
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(_QWEN2_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    else:
        raise ValueError(pre)
    tok.decoder = decoders.ByteLevel()
    types = md["tokenizer.ggml.token_type"]
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True)
                            for t, ty in zip(tokens, types) if ty == 3])
    tok.add_tokens([AddedToken(t, normalized=False, special=False)
                    for t, ty in zip(tokens, types) if ty == 4])
    return tok


def _fetch_sdist_from_pypi(dl: Path) -> None:
    """Download the sdist file itself from PyPI's JSON API (pip download of an
    sdist also prepares its metadata, which needs its build backend)."""
    import re
    import urllib.request
    try:
        with urllib.request.urlopen("https://pypi.org/simple/llama-cpp-python/", timeout=60) as r:
            page = r.read().decode("utf-8", "replace")
        url = next(m.group(1) for m in re.finditer(r'href="([^"]+)"', page)
                   if "llama_cpp_python-0.3.36.tar.gz" in m.group(1))
        if url.startswith("/"):
            url = "https://pypi.org" + url
        tmp = dl / "llama_cpp_python-0.3.36.tar.gz.part"
        with urllib.request.urlopen(url, timeout=600) as r, open(tmp, "wb") as f:
            f.write(r.read())
        tmp.rename(dl / "llama_cpp_python-0.3.36.tar.gz")
    except Exception:   # no network: the pip route below is tried next
        pass


def llama_cpp_vectors() -> Path:
    """Directory with llama.cpp's ggml-vocab-*.gguf and .inp/.out files,
    extracted from the llama-cpp-python sdist (downloaded once into the
    mlxcy cache). Raises RuntimeError when it cannot be fetched."""
    root = assets.cache_dir() / "llama-cpp-vocab"
    if (root / ".complete").exists():
        return root
    dl = assets.cache_dir() / "sdist"
    dl.mkdir(exist_ok=True)
    sdists = sorted(dl.glob("llama_cpp_python-0.3.36.tar.gz"))
    if not sdists:
        _fetch_sdist_from_pypi(dl)
        sdists = sorted(dl.glob("llama_cpp_python-0.3.36.tar.gz"))
    if not sdists:
        # --no-build-isolation: pip must not try to build the package
        r = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps",
                            "--no-binary", ":all:", "--no-build-isolation", LLAMA_CPP_SDIST,
                            "-d", str(dl)], capture_output=True, text=True, timeout=600)
        sdists = sorted(dl.glob("llama_cpp_python-0.3.36.tar.gz"))
        if not sdists:
            raise RuntimeError(f"could not download {LLAMA_CPP_SDIST}: {r.stderr[-500:]}")
    root.mkdir(exist_ok=True)
    with tarfile.open(sdists[0]) as tar:
        for m in tar.getmembers():
            name = m.name.split("/vendor/llama.cpp/models/", 1)
            if len(name) == 2 and "/" not in name[1] and name[1].startswith("ggml-vocab-"):
                data = tar.extractfile(m).read()
                (root / name[1]).write_bytes(data)
    (root / ".complete").write_text("ok")
    return root


def read_vectors(inp: Path, out: Path) -> list[tuple[str, list[int]]]:
    """llama.cpp's test vectors: texts split by a marker line, ids one line each."""
    sep = "\n__ggml_vocab_test__\n"
    texts = inp.read_text(encoding="utf-8").split(sep)
    ids = out.read_text(encoding="utf-8").split("\n")
    texts = [t for t in texts]
    if texts and texts[-1].endswith("\n__ggml_vocab_test__"):
        texts[-1] = texts[-1][:-len("\n__ggml_vocab_test__")]
    return [(t, [int(x) for x in line.split()]) for t, line in zip(texts, ids)]
