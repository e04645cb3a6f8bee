"""mlxcy's exception hierarchy: every error mlxcy raises on bad input is an
`mlxcy.Error`, and a ValueError (or TypeError for a wrong type), so callers can
catch one class for all of mlxcy or the standard class they already catch.

Each message names what is at fault: the file, and the tensor, key, field or
argument within it.

    Error
    ├── ModelFormatError      checkpoints: config.json, safetensors, GGUF, quantization layout
    │   ├── LoadError         (a checkpoint that does not fit its config)
    │   └── GGUFError         (a malformed GGUF file)
    ├── TokenizerError        tokenizer.json / GGUF tokenizer metadata
    ├── ChatTemplateError     a chat template that fails to compile or render
    ├── OptionError           a generation, sampling or training option of the wrong type or range
    ├── DataError             training data (jsonl) files
    ├── AdapterError          LoRA adapter directories
    └── SessionError          saved KV-cache sessions
"""

__all__ = ["Error", "ModelFormatError", "LoadError", "GGUFError", "TokenizerError",
           "ChatTemplateError", "OptionError", "OptionTypeError", "DataError", "AdapterError", "SessionError"]


class Error(Exception):
    """Base class of every error mlxcy raises on bad input."""


class ModelFormatError(Error, ValueError):
    """A checkpoint (config, weights, quantization layout) is malformed."""


class LoadError(ModelFormatError):
    """A checkpoint is missing, malformed, or does not fit its config."""


class GGUFError(ModelFormatError):
    """A GGUF file is malformed, truncated, or holds something we cannot map."""


class TokenizerError(Error, ValueError):
    """A tokenizer file is malformed, truncated, or uses an unsupported component."""


class ChatTemplateError(Error, ValueError):
    """A chat template failed to compile or to render (including the
    template's own raise_exception(...))."""


class OptionError(Error, ValueError):
    """An option has a value out of its range (the message names the option)."""


class OptionTypeError(Error, TypeError):
    """An option has the wrong type (the message names the option)."""


class DataError(Error, ValueError):
    """A malformed or unusable data file (the message names file and line)."""


class AdapterError(Error, ValueError):
    """An adapter directory is missing, malformed or does not fit the model."""


class SessionError(Error, ValueError):
    """A saved session (KV cache file) is malformed or does not fit the model."""
