"""`Tokenizer`: Hugging Face-compatible BPE encode/decode without Rust."""
from __future__ import annotations

import os
from pathlib import Path

from . import _bpe
from .added import AddedTokens
from .decoders import BYTE_DECODER, BYTE_ENCODER, build_decoder, byte_level_bytes
from .errors import TokenizerError
from .loader import END_OF_GENERATION, Meta, dir_meta, gguf_spec, locate, read_json
from .normalizers import build_normalizer
from .pretokenizers import plan
from .unicode_classes import char_classes

_classes_ready = False


def _ensure_classes():
    global _classes_ready
    if not _classes_ready:
        _bpe.set_char_classes(char_classes())
        _classes_ready = True


def _template(spec: dict | None, vocab: dict, where: str) -> tuple[list[int], list[int]]:
    """(prefix ids, suffix ids) a post-processor adds around a single sequence."""
    if spec is None:
        return [], []
    kind = spec.get("type")
    if kind == "Sequence":
        pre, suf = [], []
        for s in spec.get("processors", []):
            p, q = _template(s, vocab, where)
            pre, suf = pre + p, suf + q
        return pre, suf
    if kind == "ByteLevel":   # only touches offsets
        return [], []
    if kind != "TemplateProcessing":
        raise TokenizerError(f"{where}: unsupported post_processor type {kind!r}")
    specials = spec.get("special_tokens", {})
    pre, suf, seen = [], [], False
    for item in spec.get("single", []):
        if "Sequence" in item:
            seen = True
        elif "SpecialToken" in item:
            name = item["SpecialToken"]["id"]
            ids = specials.get(name, {}).get("ids")
            if ids is None:
                ids = [vocab[name]] if name in vocab else None
            if ids is None:
                raise TokenizerError(f"{where}: TemplateProcessing names unknown token {name!r}")
            (suf if seen else pre).extend(ids)
        else:
            raise TokenizerError(f"{where}: malformed TemplateProcessing item {item!r}")
    return pre, suf


class Tokenizer:
    """Byte-level and SentencePiece-style BPE tokenizer, id-for-id identical to
    Hugging Face `tokenizers`. Build with `load`, `from_dir`, `from_file` or
    `from_gguf`."""

    # ------------------------------------------------------------ loading
    @classmethod
    def load(cls, path) -> "Tokenizer":
        """A model directory, a tokenizer.json, or a GGUF file."""
        kind, p = locate(path)
        return {"dir": cls.from_dir, "json": cls.from_file, "gguf": cls.from_gguf}[kind](p)

    @classmethod
    def from_dir(cls, path) -> "Tokenizer":
        """tokenizer.json plus tokenizer_config.json / special_tokens_map.json /
        generation_config.json / config.json from one directory."""
        d = Path(os.fspath(path))
        tj = d / "tokenizer.json"
        if not tj.exists():
            raise FileNotFoundError(f"{d}: no tokenizer.json")
        return cls(read_json(tj), dir_meta(d), str(tj))

    @classmethod
    def from_file(cls, path) -> "Tokenizer":
        """A lone tokenizer.json (the configs beside it are read too, if any)."""
        p = Path(os.fspath(path))
        return cls(read_json(p), dir_meta(p.parent), str(p))

    @classmethod
    def from_gguf(cls, path) -> "Tokenizer":
        """The tokenizer in a GGUF file's `tokenizer.ggml.*` metadata."""
        spec, meta = gguf_spec(path)
        return cls(spec, meta, str(path))

    def __init__(self, spec: dict, meta: Meta | None = None, source: str = "<dict>"):
        _ensure_classes()
        self.source = source
        meta = meta or Meta()
        try:
            self._build_model(spec.get("model"))
            self._build_added(spec.get("added_tokens") or [])
            self._normalize = build_normalizer(spec.get("normalizer"))
            self._decoder_spec = spec.get("decoder")
            self._decode_tokens = build_decoder(spec.get("decoder"))
            self._prefix, self._suffix = _template(spec.get("post_processor"), self._vocab, source)
            plan(spec.get("pre_tokenizer"))     # checked now (regexes compile), used later
            for i in self._prefix + self._suffix:
                if type(i) is not int or i not in self._id_to_token:
                    raise TokenizerError(f"post_processor: token id {i!r:.40} is not in the "
                                         f"vocabulary")
        except TokenizerError as e:
            if source in str(e):
                raise
            raise TokenizerError(f"{source}: {e}") from None
        except (KeyError, TypeError, AttributeError, ValueError, OverflowError, IndexError,
                RecursionError) as e:
            raise TokenizerError(f"{source}: malformed tokenizer definition ({e!r})") from e
        if spec.get("id_to_token"):
            for i, t in enumerate(spec["id_to_token"]):
                self._id_to_token[i] = t
        self._set_special(meta)
        self._pretok_spec = spec.get("pre_tokenizer")

    def _build_model(self, m: dict | None) -> None:
        if not isinstance(m, dict):
            raise TokenizerError("missing model section")
        if m.get("type", "BPE") != "BPE":
            raise TokenizerError(f"unsupported model type {m.get('type')!r}")
        for key in ("continuing_subword_prefix", "end_of_word_suffix"):
            if m.get(key):
                raise TokenizerError(f"unsupported BPE option {key}={m[key]!r}")
        if m.get("dropout"):
            raise TokenizerError("unsupported BPE option dropout (non-deterministic)")
        if m.get("unk_token") is not None and not isinstance(m["unk_token"], str):
            raise TokenizerError("model.unk_token must be a string or null")
        vocab = m["vocab"]
        if not isinstance(vocab, dict):
            raise TokenizerError("model.vocab must be an object")
        for t, i in vocab.items():
            if type(i) is not int or not 0 <= i < 2**31 - 1:
                raise TokenizerError(f"model.vocab[{t!r:.40}] = {i!r:.40} is not a token id "
                                     f"(an int in [0, 2**31 - 1))")
        merges = m.get("merges", [])
        if not isinstance(merges, list) or not all(
                isinstance(x, str) and " " in x
                or isinstance(x, list) and len(x) == 2 and all(isinstance(y, str) for y in x)
                for x in merges):
            raise TokenizerError("model.merges must be a list of \"a b\" strings or [a, b] pairs")
        self._vocab = dict(vocab)
        self._id_to_token = {i: t for t, i in vocab.items()}
        self._plan = None
        self._model = m

    def _make_core(self, pretok_spec) -> None:
        """Compile the vocabulary and merges into the native BPECore."""
        m, p = self._model, plan(pretok_spec)
        byte_level = p.byte_level
        self._byte_level = byte_level
        if byte_level:
            key = lambda t: byte_level_bytes(t)   # noqa: E731
            byte_ids = [self._vocab.get(BYTE_ENCODER[b], -1) for b in range(256)]
        else:
            key = lambda t: t.encode("utf-8")     # noqa: E731
            byte_ids = ([self._vocab.get(f"<0x{b:02X}>", -1) for b in range(256)]
                        if m.get("byte_fallback") else None)
        vb = {key(t): i for t, i in self._model_vocab.items()}
        merges = []
        v = self._model_vocab
        for k, mg in enumerate(m.get("merges", [])):
            a, b = mg.split(" ", 1) if isinstance(mg, str) else mg
            try:
                merges.append((v[a], v[b], v[a + b]))
            except KeyError as e:
                raise TokenizerError(f"merge #{k} {a!r} {b!r} uses a token missing from the "
                                     f"vocabulary: {e.args[0]!r}") from None
        unk = m.get("unk_token")
        core = _bpe.BPECore(vb, merges, byte_level=byte_level,
                            byte_fallback=bool(m.get("byte_fallback")),
                            ignore_merges=bool(m.get("ignore_merges")),
                            fuse_unk=bool(m.get("fuse_unk")),
                            unk_id=v.get(unk) if unk is not None else None, byte_ids=byte_ids)
        split_before, guard = None, ""
        if not byte_level and p.mode == 0 and not p.digits_individual:
            split_before = "\u2581"
            guard = "".join(sorted({t[i - 1] for t in v for i in range(1, len(t))
                                    if t[i] == "\u2581" and t[i - 1] != "\u2581"}))
        core.set_pretokenizer(p.mode, p.max_digits, p.digits_individual, split_before, guard)
        self._core, self._plan = core, p

    def _build_added(self, added: list) -> None:
        self._model_vocab = dict(self._vocab)
        self._special_ids = set()
        raw, norm = [], []
        if not isinstance(added, list):
            raise TokenizerError("added_tokens must be a list")
        for k, t in enumerate(added):
            if not isinstance(t, dict) or type(t.get("id")) is not int \
                    or not 0 <= t["id"] < 2**31 - 1 or not isinstance(t.get("content"), str) \
                    or not t["content"]:
                raise TokenizerError(f"added_tokens[{k}] must be an object with an int 'id' in "
                                     f"[0, 2**31 - 1) and a non-empty string 'content'")
        self._added_ids = {t["id"] for t in added}
        for t in added:
            tid, content = t["id"], t["content"]
            self._vocab.setdefault(content, tid)
            self._id_to_token[tid] = content
            if t.get("special"):
                self._special_ids.add(tid)
            (norm if t.get("normalized", not t.get("special")) else raw).append(
                dict(t, id=self._vocab[content]))
        self._added_raw, self._added_norm = AddedTokens(raw), AddedTokens(norm)

    def _lookup(self, tok) -> int | None:
        if isinstance(tok, int):
            return tok if tok in self._id_to_token else None
        return self._vocab.get(tok) if tok is not None else None

    def _set_special(self, meta: Meta) -> None:
        self.bos_id = self._lookup(meta.bos)
        self.pad_id = self._lookup(meta.pad)
        self.unk_id = self._lookup(meta.unk if meta.unk is not None else self._model.get("unk_token"))
        eos = [self._lookup(e) for e in meta.eos]
        eos = [e for e in eos if e is not None]
        self.eos_id = eos[0] if eos else None
        eog = set(eos)
        # Only added tokens count: a byte-level vocabulary may hold "</s>" as text.
        added = {t: i for i, t in self._id_to_token.items() if i in self._added_ids}
        eog.update(added[t] for t in END_OF_GENERATION if t in added)
        self.eos_ids = frozenset(eog)
        self.chat_template = meta.chat_template
        if not self._prefix and not self._suffix:   # GGUF: add_bos / add_eos flags
            if meta.add_bos and self.bos_id is not None:
                self._prefix = [self.bos_id]
            if meta.add_eos and self.eos_id is not None:
                self._suffix = [self.eos_id]
        self.add_bos = self.bos_id is not None and self.bos_id in self._prefix

    # ------------------------------------------------------------ encoding
    def _ensure_core(self):
        if self._plan is None:
            try:
                self._make_core(self._pretok_spec)
            except TokenizerError as e:
                if self.source in str(e):
                    raise
                raise TokenizerError(f"{self.source}: {e}") from None
            except (KeyError, TypeError, AttributeError, ValueError, OverflowError,
                    IndexError, RecursionError) as e:
                raise TokenizerError(f"{self.source}: malformed tokenizer definition "
                                     f"({e!r})") from e

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`, with the post-processor's BOS/EOS when asked."""
        if not isinstance(text, str):
            raise TypeError(f"encode() takes a str, not {type(text).__name__}")
        self._ensure_core()
        ids: list[int] = []
        pos = 0
        for piece, tok in self._added_raw.split(text):
            if tok is not None:
                ids.append(tok["id"])
            else:
                self._encode_piece(piece, pos == 0, ids)
            pos += 1
        if add_special_tokens and (self._prefix or self._suffix):
            return self._prefix + ids + self._suffix
        return ids

    def _encode_piece(self, text: str, first: bool, ids: list) -> None:
        if self._normalize is not None:
            text = self._normalize(text)
        for k, (piece, tok) in enumerate(self._added_norm.split(text)):
            if tok is not None:
                ids.append(tok["id"])
                continue
            pieces = [(piece, first and k == 0)]
            for step in self._plan.python_steps:
                pieces = step(pieces)
            for p, _ in pieces:
                if self._plan.prefix_space and not p.startswith(" "):
                    p = " " + p
                self._core.encode(p, ids)

    def encode_batch(self, texts, add_special_tokens: bool = True) -> list[list[int]]:
        """encode() over a list of texts."""
        return [self.encode(t, add_special_tokens) for t in texts]

    # ------------------------------------------------------------ decoding
    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        """Text of `ids`, through the tokenizer.json decoder."""
        tokens = []
        table, special = self._id_to_token, self._special_ids
        for i in ids:
            t = table.get(i) if isinstance(i, int) else None
            if t is None:
                raise ValueError(f"token id {i!r} is out of range for this vocabulary "
                                 f"(0..{self.vocab_size - 1})")
            if skip_special_tokens and i in special:
                continue
            tokens.append(t)
        return "".join(self._decode_tokens(tokens))

    def decode_stream(self, skip_special_tokens: bool = False):
        """A StreamDecoder: push ids one at a time, get only complete text."""
        from .stream import StreamDecoder
        return StreamDecoder(self, skip_special_tokens)

    # ------------------------------------------------------------ vocabulary
    def token_to_id(self, token: str) -> int | None:
        return self._vocab.get(token)

    def id_to_token(self, i: int) -> str | None:
        return self._id_to_token.get(i)

    @property
    def vocab_size(self) -> int:
        """Number of ids (model vocabulary plus added tokens)."""
        return max(self._id_to_token) + 1 if self._id_to_token else 0

    def get_vocab(self) -> dict:
        return dict(self._vocab)

    @property
    def special_ids(self) -> frozenset:
        return frozenset(self._special_ids)

    def __repr__(self):
        return f"Tokenizer({self.source!r}, vocab_size={self.vocab_size})"
