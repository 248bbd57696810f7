"""mimlab: masked image modeling research library."""

__version__ = "0.1.0"
