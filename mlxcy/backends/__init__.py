"""Adapters that put other engines behind mlxcy's TextModel interface."""
