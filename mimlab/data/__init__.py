"""Layer 2, data: the :class:`~.batch.Batch` item every dataset yields, datasets by path and kind
(:mod:`.datasets`) and WebDataset shards (:mod:`.shards`).

The names of :mod:`.datasets` are also reachable here (``from mimlab.data import build_dataset``,
as before the package layout); they are imported on first use, so ``mimlab.data.batch`` stays
free of torch.
"""

from typing import Any


def __getattr__(name: str) -> Any:
    if name.startswith("__") or name in ("batch", "datasets", "shards"):
        raise AttributeError(name)  # dunders, and submodules not yet imported: the import system
    from . import datasets  # lazy: keeps `import mimlab.data.batch` free of torch

    try:
        return getattr(datasets, name)
    except AttributeError:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
