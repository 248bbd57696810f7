"""Layer 5, training: the one engine, pretraining, run directories, adopting pretrained weights
and the online evaluator the engine calls during pretraining.

``from mimlab.train import pretrain`` (the function) works as before the package layout; the
module that defines it is :mod:`.pretraining`.
"""

from typing import Any


def __getattr__(name: str) -> Any:
    if name == "pretrain":
        from .pretraining import pretrain  # lazy: keeps `import mimlab.train.<module>` light

        return pretrain
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
