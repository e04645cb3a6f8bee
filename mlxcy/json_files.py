"""JSON files that must hold an object (configs, adapter and training state),
read with the package's errors: the caller's mlxcy.Error class names the file."""
from __future__ import annotations

import json

__all__ = ["read_json_object"]


def read_json_object(path, error) -> dict:
    """The object in JSON file `path`; `error` (an mlxcy.Error class) naming
    the file when it is not UTF-8 JSON (or nested past Python's recursion
    limit, where json raises RecursionError) or holds no object.  A missing
    file raises FileNotFoundError."""
    try:
        with open(path, encoding="utf-8") as f:
            d = json.load(f)
    except (ValueError, RecursionError) as e:   # (JSONDecodeError, UnicodeDecodeError)
        raise error(f"{path}: invalid JSON: {e}") from None
    if not isinstance(d, dict):
        raise error(f"{path}: expected a JSON object, got {type(d).__name__}")
    return d
