"""Types of mlxcy.tokenizer._bpe (_bpe.pyx): the native pre-tokenizer and BPE
merge loop under mlxcy.tokenizer (private: used through Tokenizer)."""
from collections.abc import Sequence

from typing_extensions import Buffer, disjoint_base

MODE_NONE: int
MODE_LLAMA3: int
MODE_GPT2: int

def set_char_classes(table: Buffer) -> None:
    """Install the code point class table (0x110000 bytes: 1 letter, 2 number, 4 White_Space)."""

@disjoint_base
class BPECore:
    """Pre-tokenizer + BPE model over one vocabulary."""

    def __init__(
        self,
        vocab_bytes: dict[bytes, int],
        merges: list[tuple[int, int, int]],
        *,
        byte_level: bool,
        byte_fallback: bool = False,
        ignore_merges: bool = False,
        fuse_unk: bool = False,
        unk_id: int | None = None,
        byte_ids: Sequence[int] | None = None,
    ) -> None:
        """vocab_bytes: {bytes: id}; merges: [(left_id, right_id, new_id)] best
        first; byte_ids: 256 ids (byte alphabet / <0xXX> tokens, -1 missing)."""
    def set_pretokenizer(
        self,
        mode: int,
        max_digits: int = 0,
        digits_individual: bool = False,
        split_before: str | None = None,
        split_guard: str = "",
    ) -> None: ...
    def encode(self, text: str, out: list[int]) -> None:
        """Pre-tokenize `text` and append the BPE ids of every word to `out`."""
    def bpe_word(self, word: bytes) -> list[int]:
        """BPE ids of one already pre-tokenized word."""
    def clear_cache(self) -> None: ...
