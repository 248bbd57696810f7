"""mimlab: masked image modeling research library."""

from .core.moved import install as _install_moved_paths

__version__ = "0.1.0"

_install_moved_paths()  # `import mimlab.config` etc. still work: see mimlab/core/moved.py
