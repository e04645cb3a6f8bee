"""The `mlxcy` command (also `python -m mlxcy`); its entry point is
mlxcy.cli.main.

commands: the parser and the generate/chat/info/discover/convert/bench/
    perplexity/launch commands.
train: the lora and fuse commands.
bench: `mlxcy bench`'s measurements.
common: what every command shares (UsageError, check_output_dir, run).
(`mlxcy serve` registers itself from mlxcy.serve.)
"""
from mlxcy.cli.commands import build_parser, main  # noqa: F401
