"""The one exception type the tokenizer raises for unsupported or bad files."""


from mlxcy.errors import TokenizerError  # noqa: E402,F401  (re-exported)
