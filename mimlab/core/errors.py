"""Exceptions shared by every layer (imported by the lowest modules, so it imports nothing)."""


class ConfigError(ValueError):
    """A configuration problem, reported in one line before any work starts."""
