"""Read tokenizer definitions: tokenizer.json (+ the configs beside it) and
GGUF metadata. Both end as a tokenizer.json-shaped dict plus a `Meta` record,
so one code path (`Tokenizer._build`) assembles every tokenizer."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from .errors import TokenizerError
from mlxcy.errors import GGUFError
from mlxcy.gguf_reader import read_metadata
from .pretokenizers import GPT2_REGEX, _LLAMA3_TEMPLATE  # noqa: F401

# Texts llama.cpp also treats as end of generation when present in a vocabulary.
END_OF_GENERATION = ("<|eot_id|>", "<|eom_id|>", "<|end_of_text|>", "<|im_end|>", "<|endoftext|>",
                     "<end_of_turn>", "<|end|>", "<|return|>", "<|call|>", "</s>", "<eos>",
                     "<|EOT|>", "<EOT>", "<|end▁of▁sentence|>")


@dataclass
class Meta:
    """What lives outside tokenizer.json proper."""
    bos: str | int | None = None
    eos: list = field(default_factory=list)     # token texts or ids
    pad: str | int | None = None
    unk: str | int | None = None
    add_bos: bool | None = None
    add_eos: bool | None = None
    chat_template: str | None = None
    source: str = ""


def read_json(path: Path, what: str = "") -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise TokenizerError(f"{path}: malformed or truncated JSON ({e})") from e
    except UnicodeDecodeError as e:
        raise TokenizerError(f"{path}: not UTF-8 JSON ({e})") from e
    except RecursionError:
        raise TokenizerError(f"{path}: JSON nested too deeply") from None
    if not isinstance(data, dict):
        raise TokenizerError(f"{path}: expected a JSON object{what}")
    return data


def _token_text(v):
    """special_tokens_map / tokenizer_config spell tokens as str or {"content": str}."""
    if isinstance(v, dict):
        return v.get("content")
    return v


def dir_meta(directory: Path) -> Meta:
    """BOS/EOS/pad, add_bos and the chat template from the files beside tokenizer.json."""
    m = Meta(source=str(directory))
    cfg = {}
    for name in ("config.json", "generation_config.json", "special_tokens_map.json",
                 "tokenizer_config.json"):  # later files override earlier ones
        p = directory / name
        if not p.exists():
            continue
        d = read_json(p)
        for key in ("bos_token", "pad_token", "unk_token"):
            if d.get(key) is not None:
                setattr(m, key[:-6], _token_text(d[key]))
        if d.get("eos_token") is not None:
            m.eos.append(_token_text(d["eos_token"]))
        for key, attr in (("bos_token_id", "bos"), ("pad_token_id", "pad")):
            if isinstance(d.get(key), int) and getattr(m, attr) is None:
                setattr(m, attr, d[key])
        eid = d.get("eos_token_id")
        m.eos.extend(eid if isinstance(eid, list) else [eid] if isinstance(eid, int) else [])
        if name == "tokenizer_config.json":
            cfg = d
    if "add_bos_token" in cfg:
        m.add_bos = bool(cfg["add_bos_token"])
    if "add_eos_token" in cfg:
        m.add_eos = bool(cfg["add_eos_token"])
    tpl = cfg.get("chat_template")
    if isinstance(tpl, list):  # [{"name": "default", "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in tpl if isinstance(t, dict)}
        tpl = named.get("default") or next(iter(named.values()), None)
    if tpl is None and (directory / "chat_template.jinja").exists():
        tpl = (directory / "chat_template.jinja").read_text(encoding="utf-8")
    m.chat_template = tpl
    return m


# ---------------------------------------------------------------- GGUF

def _gguf_pre_tokenizer(pre: str, path) -> tuple[dict | None, dict | None, bool]:
    """(pre_tokenizer, normalizer, ignore_merges) for a gpt2-style GGUF vocabulary,
    as llama.cpp splits text for each `tokenizer.ggml.pre`."""
    llama3 = {"type": "Split", "pattern": {"Regex": _LLAMA3_TEMPLATE % "{1,3}"},
              "behavior": "Isolated", "invert": False}
    qwen2 = dict(llama3, pattern={"Regex": _LLAMA3_TEMPLATE % ""})
    bl = {"type": "ByteLevel", "add_prefix_space": False, "use_regex": False}
    if pre in ("llama3", "llama-v3", "llama-bpe", "smaug-bpe", "falcon3", "pixtral", "dbrx"):
        return {"type": "Sequence", "pretokenizers": [llama3, bl]}, None, True
    if pre in ("qwen2", "deepseek-r1-qwen"):
        return ({"type": "Sequence", "pretokenizers": [qwen2, bl]}, {"type": "NFC"}, False)
    if pre in ("smollm", "starcoder", "refact"):
        return ({"type": "Sequence", "pretokenizers": [
            {"type": "Digits", "individual_digits": True},
            dict(bl, use_regex=True)]}, None, False)
    if pre in ("gpt-2", "gpt2", "default"):
        return dict(bl, use_regex=True), None, False
    raise TokenizerError(f"{path}: unsupported GGUF pre-tokenizer tokenizer.ggml.pre={pre!r}")


def _splits(t: str, vocab: dict) -> list[tuple[str, str]]:
    return [(t[:k], t[k:]) for k in range(1, len(t)) if t[:k] in vocab and t[k:] in vocab]


def _gemma_merges(tokens: list[str]) -> list[list[str]]:
    """Rebuild merges from a SentencePiece vocabulary: every split of a token
    into two tokens, best first by the token's position in the file, then the
    longer left part first (the order transformers' GGUF converter uses; a
    repeated spelling counts at its last position, as in a dict)."""
    index = {t: i for i, t in enumerate(tokens)}
    out = []
    for t, _ in sorted(index.items(), key=lambda kv: kv[1]):
        out.extend([a, b] for a, b in reversed(_splits(t, index)))
    return out


def _score_merges(tokens: list[str], scores: list[float]) -> list[list[str]]:
    """Merges from scores: all splits, sorted by (score, left length, right
    length), highest first; ties keep vocabulary order."""
    vocab = {t: i for i, t in enumerate(tokens)}
    score = dict(zip(tokens, scores))
    cand = []
    for t, sc in score.items():
        local = sorted(_splits(t, vocab), key=lambda p: (vocab[p[0]], vocab[p[1]]))
        cand.extend((sc, len(a), len(b), a, b) for a, b in local)
    cand.sort(key=lambda c: (c[0], c[1], c[2]), reverse=True)
    return [[a, b] for _, _, _, a, b in cand]


def _check_list(path, md, key, kind, length=None):
    v = md.get(key)
    if v is None:
        return
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if not isinstance(v, list) or not all(type(x) in kinds for x in v):
        raise TokenizerError(f"{path}: GGUF key {key!r} must be a list of "
                             f"{' or '.join(k.__name__ for k in kinds)}")
    if length is not None and len(v) != length:
        raise TokenizerError(f"{path}: GGUF key {key!r} has {len(v)} entries for "
                             f"{length} tokens")


def gguf_spec(path) -> tuple[dict, Meta]:
    """A tokenizer.json-shaped dict and Meta from a GGUF file's metadata."""
    try:
        md = read_metadata(path)
    except GGUFError as e:          # a tokenizer file at fault: the tokenizer's error class
        raise TokenizerError(str(e)) from e
    try:
        model = md["tokenizer.ggml.model"]
        tokens = md["tokenizer.ggml.tokens"]
    except KeyError as e:
        raise TokenizerError(f"{path}: GGUF metadata lacks {e.args[0]}") from None
    _check_list(path, md, "tokenizer.ggml.tokens", str)
    _check_list(path, md, "tokenizer.ggml.merges", str)
    _check_list(path, md, "tokenizer.ggml.token_type", int, len(tokens))
    _check_list(path, md, "tokenizer.ggml.scores", (int, float), len(tokens))
    if not isinstance(model, str):
        raise TokenizerError(f"{path}: GGUF key 'tokenizer.ggml.model' must be a string")
    if not tokens:
        raise TokenizerError(f"{path}: GGUF key 'tokenizer.ggml.tokens' is empty")
    types = md.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    arch = md.get("general.architecture", "")
    meta = Meta(source=str(path), chat_template=md.get("tokenizer.chat_template"))
    for key, attr in (("bos_token_id", "bos"), ("padding_token_id", "pad"),
                      ("unknown_token_id", "unk")):
        v = md.get(f"tokenizer.ggml.{key}")
        if isinstance(v, int) and 0 <= v < len(tokens):
            setattr(meta, attr, v)
    if isinstance(md.get("tokenizer.ggml.eos_token_id"), int):
        meta.eos.append(md["tokenizer.ggml.eos_token_id"])
    if "tokenizer.ggml.eot_token_id" in md:
        meta.eos.append(md["tokenizer.ggml.eot_token_id"])

    if model == "gpt2":
        pre_tok, norm, ignore = _gguf_pre_tokenizer(md.get("tokenizer.ggml.pre", "default"), path)
        if "tokenizer.ggml.merges" not in md:
            raise TokenizerError(f"{path}: gpt2 GGUF tokenizer without tokenizer.ggml.merges")
        bpe = {"type": "BPE", "vocab": {t: i for i, t in enumerate(tokens)},
               "merges": list(md["tokenizer.ggml.merges"]), "ignore_merges": ignore}
        spec = {"model": bpe, "normalizer": norm, "pre_tokenizer": pre_tok,
                "decoder": {"type": "ByteLevel"}, "post_processor": None}
        meta.add_bos = bool(md.get("tokenizer.ggml.add_bos_token", False))
    elif model == "llama":
        spec = _spm_spec(md, tokens, types, arch, meta, path)
    else:
        raise TokenizerError(f"{path}: unsupported GGUF tokenizer model "
                             f"tokenizer.ggml.model={model!r}")
    meta.add_eos = bool(md.get("tokenizer.ggml.add_eos_token", False))
    # Control tokens (type 3) become special added tokens; user-defined ones
    # (type 4) plain added tokens, when the vocabulary spells them the same.
    vocab = spec["model"]["vocab"]
    spec["added_tokens"] = [
        {"id": i, "content": t, "special": ty == 3, "normalized": False, "lstrip": False,
         "rstrip": False, "single_word": False}
        for i, (t, ty) in enumerate(zip(tokens, types))
        if ty == 3 or (ty == 4 and t in vocab)]
    spec["id_to_token"] = spec["model"].pop("_tokens", None)
    return spec, meta


def _spm_spec(md, tokens, types, arch, meta, path) -> dict:
    """SentencePiece-style BPE (Gemma, Llama 2): byte fallback, merges rebuilt."""
    if arch.startswith("gemma"):
        # Whitespace-run tokens are stored with real spaces; the normalized
        # text spells them with U+2581.
        spelled = ["\u2581" * len(t) if " " in t and not t.strip() else t for t in tokens]
        merges = _gemma_merges(spelled)
        normalizer = {"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"}
        pre_tok = None
        decoder = {"type": "Sequence", "decoders": [
            {"type": "Replace", "pattern": {"String": "\u2581"}, "content": " "},
            {"type": "ByteFallback"}, {"type": "Fuse"}]}
    else:
        spelled = tokens
        scores = md.get("tokenizer.ggml.scores")
        if scores is None:
            raise TokenizerError(f"{path}: SentencePiece GGUF without tokenizer.ggml.scores")
        merges = _score_merges(tokens, scores)
        prefix = bool(md.get("tokenizer.ggml.add_space_prefix", True))
        # As Llama 2's tokenizer.json and llama.cpp: always a leading U+2581.
        normalizer = {"type": "Sequence", "normalizers": (
            [{"type": "Prepend", "prepend": "\u2581"}] if prefix else []) + [
            {"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"}]}
        pre_tok = None
        decoder = {"type": "Sequence", "decoders": [
            {"type": "Replace", "pattern": {"String": "\u2581"}, "content": " "},
            {"type": "ByteFallback"}, {"type": "Fuse"}]
            + ([{"type": "Strip", "content": " ", "start": 1, "stop": 0}] if prefix else [])}
    unk = spelled[meta.unk] if isinstance(meta.unk, int) else None
    bpe = {"type": "BPE", "vocab": {t: i for i, t in enumerate(spelled)},
           "merges": merges, "byte_fallback": True, "fuse_unk": True, "unk_token": unk,
           "_tokens": spelled}
    meta.add_bos = bool(md.get("tokenizer.ggml.add_bos_token", True))
    return {"model": bpe, "normalizer": normalizer, "pre_tokenizer": pre_tok,
            "decoder": decoder, "post_processor": None}


def is_gguf(path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"GGUF"
    except OSError:
        return False


def locate(path) -> tuple[str, Path]:
    """('dir'|'json'|'gguf', path) for what `Tokenizer.load` was given."""
    p = Path(os.fspath(path))
    if p.is_dir():
        return "dir", p
    if not p.exists():
        raise FileNotFoundError(f"no tokenizer at {p}")
    return ("gguf" if is_gguf(p) else "json"), p
