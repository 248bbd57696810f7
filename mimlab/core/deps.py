"""Third-party imports with side effects mimlab does not want.

timm's ``timm.utils.summary`` runs ``import wandb`` when it is installed (over a second, and
wandb must not be imported unless ``log.wandb`` is on). :func:`import_timm` imports timm with
that import blocked; mimlab's own W&B sink (:mod:`mimlab.io.tracking`) imports wandb as usual
later.
"""

from __future__ import annotations

import sys


def import_timm() -> None:
    """Import timm once, without letting it import wandb (no-op when timm is loaded)."""
    if "timm" in sys.modules:
        return
    blocked = "wandb" not in sys.modules
    if blocked:
        sys.modules["wandb"] = None  # type: ignore[assignment]  # `import wandb` -> ImportError
    try:
        import timm  # noqa: F401  # lazy: heavy; imported by the layers that build models
    finally:
        if blocked and "wandb" in sys.modules and sys.modules["wandb"] is None:
            del sys.modules["wandb"]
