"""Native BPE tokenizer, id-for-id compatible with Hugging Face `tokenizers`.

    from mlxcy.tokenizer import Tokenizer
    tok = Tokenizer.load("path/to/model_dir_or.gguf")
    ids = tok.encode("Hello"); text = tok.decode(ids)
"""
from .core import Tokenizer  # noqa: F401
from .errors import TokenizerError  # noqa: F401
from .stream import StreamDecoder  # noqa: F401

__all__ = ["Tokenizer", "TokenizerError", "StreamDecoder"]
