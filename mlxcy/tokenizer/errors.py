"""The one exception type the tokenizer raises for unsupported or bad files."""


class TokenizerError(ValueError):
    """A tokenizer file is malformed, truncated, or uses an unsupported component."""
