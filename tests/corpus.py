"""A deterministic multilingual test corpus (no downloaded data).

Mixes generated prose in many scripts, real source code and prose from
Python's own standard library, emoji (with ZWJ sequences and modifiers),
whitespace runs, digit runs and contractions in mixed case.
"""
from __future__ import annotations

import os
import random
import sysconfig

# (first, last) code point ranges of letters in many scripts
SCRIPTS = {
    "latin": [(0x61, 0x7A), (0xE0, 0xFF), (0x100, 0x17F)], "greek": [(0x3B1, 0x3C9)],
    "cyrillic": [(0x430, 0x44F)], "armenian": [(0x561, 0x586)], "hebrew": [(0x5D0, 0x5EA)],
    "arabic": [(0x627, 0x64A)], "devanagari": [(0x905, 0x939), (0x93E, 0x94C)],
    "bengali": [(0x985, 0x9B9)], "thai": [(0xE01, 0xE30)], "georgian": [(0x10D0, 0x10F0)],
    "hangul": [(0xAC00, 0xD7A3)], "hiragana": [(0x3041, 0x3096)], "katakana": [(0x30A1, 0x30FA)],
    "cjk": [(0x4E00, 0x9FFF)], "ethiopic": [(0x1200, 0x1248)], "tamil": [(0xB85, 0xBB9)],
}
EMOJI = ["😀", "🤖", "🎉", "👍🏽", "👨‍👩‍👧", "🏳️‍🌈", "❤️", "🇫🇷", "🧑🏿‍💻", "✨", "🙈", "💯"]
CONTRACTIONS = ["it's", "IT'S", "We'Re", "they've", "I'M", "you'll", "She'D", "don't",
                "CAN'T", "o'clock", "'S", "'ll", "rock'n'roll"]
SPACES = [" ", "  ", "   ", "\t", "\n", "\n\n", " \n", "\r\n", "    ", "\u3000", "\u00a0", " \t "]
PUNCT = list(".,;:!?-()[]{}\"'/\\@#$%^&*_+=<>|~`") + ["...", "—", "«", "»", "。", "、", "¿"]


def _word(rng: random.Random, script: str) -> str:
    ranges = SCRIPTS[script]
    n = rng.randint(1, 4) if script in ("cjk", "hangul") else rng.randint(1, 10)
    out = []
    for _ in range(n):
        a, b = rng.choice(ranges)
        out.append(chr(rng.randint(a, b)))
    w = "".join(out)
    return w.capitalize() if rng.random() < 0.2 else w


def _prose(rng: random.Random, n_words: int) -> str:
    script = rng.choice(list(SCRIPTS))
    parts = []
    for _ in range(n_words):
        r = rng.random()
        if r < 0.70:
            parts.append(_word(rng, script if rng.random() < 0.9 else rng.choice(list(SCRIPTS))))
        elif r < 0.78:
            parts.append(rng.choice(CONTRACTIONS))
        elif r < 0.86:
            parts.append(str(rng.randint(0, 10 ** rng.randint(1, 12))))
        elif r < 0.92:
            parts.append(rng.choice(EMOJI) * rng.randint(1, 3))
        else:
            parts.append(rng.choice(PUNCT))
        parts.append(rng.choice(SPACES) if rng.random() < 0.15 else " ")
    return "".join(parts)


def _stdlib_texts(rng: random.Random) -> list[str]:
    """Real code and docs: .py and .txt files of the running Python's stdlib."""
    root = sysconfig.get_paths()["stdlib"]
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in ("site-packages", "__pycache__"))
        files.extend(os.path.join(dirpath, f) for f in sorted(filenames)
                     if f.endswith((".py", ".txt")))
    rng.shuffle(files)
    return files


def corpus(size: int = 1 << 20, seed: int = 0) -> list[str]:
    """Documents totalling at least `size` UTF-8 bytes: half generated prose,
    half stdlib code/text (cut into chunks of at most 4 KB)."""
    rng = random.Random(seed)
    docs, total = [], 0
    files = iter(_stdlib_texts(rng))
    while total < size:
        if rng.random() < 0.5:
            doc = _prose(rng, rng.randint(20, 400))
        else:
            path = next(files, None)
            if path is None:
                doc = _prose(rng, 200)
            else:
                with open(path, encoding="utf-8", errors="replace") as f:
                    text = f.read()
                start = rng.randint(0, max(0, len(text) - 4096))
                doc = text[start:start + rng.randint(200, 4096)]
        docs.append(doc)
        total += len(doc.encode("utf-8"))
    return docs


def _newer_than_reference(c: int) -> bool:
    """Unassigned in Python's Unicode 14 tables but possibly assigned since:
    mlxcy's letter/number classes come from `regex` (Unicode 17) and
    `tokenizers`' Oniguruma is Unicode 16, so those may legitimately differ.
    Planes 4-13 have never had assignments and stay in."""
    import unicodedata
    return unicodedata.category(chr(c)) == "Cn" and not 0x40000 <= c < 0xE0000


def random_strings(n: int = 1000, seed: int = 1) -> list[str]:
    """Random code point strings: any assigned-or-not code point except
    surrogates, with extra weight on ASCII, spaces and combining marks."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        chars = []
        for _ in range(rng.randint(0, 40)):
            r = rng.random()
            if r < 0.3:
                c = rng.randint(0x20, 0x7E)
            elif r < 0.4:
                c = ord(rng.choice(" \t\n\r\u00a0\u2581\u3000"))
            elif r < 0.5:
                c = rng.randint(0x300, 0x36F)
            elif r < 0.8:
                c = rng.randint(0x80, 0xFFFF)
            else:
                c = rng.randint(0x10000, 0x10FFFF)
            if 0xD800 <= c < 0xE000 or _newer_than_reference(c):
                c = 0xFFFD
            chars.append(chr(c))
        out.append("".join(chars))
    return out
