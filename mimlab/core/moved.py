"""Import paths from before the package layout (``mimlab.config``, ``mimlab.engine``, ...).

mimlab's modules live in one folder per layer (``core``, ``nn``, ``data``, ``io``, ``methods``,
``train``, ``eval``, ``analysis``, ``experiments``). Code written against the flat layout keeps
working: ``import mimlab.config`` returns the module :mod:`mimlab.core.config` itself (the same
object, so classes compare equal), imported on first use. :data:`MOVED` is the whole map.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
from types import ModuleType
from typing import Optional, Sequence

#: old module (relative to ``mimlab``) -> its module today
MOVED = {
    "errors": "core.errors",
    "registry": "core.registry",
    "paper_settings": "core.paper_settings",
    "config": "core.config",
    "stats": "core.stats",
    "dist": "core.dist",
    "ops": "nn.ops",
    "losses": "nn.losses",
    "augment": "nn.augment",
    "models": "nn.models",
    "teachers": "nn.teachers",
    "eval.knn": "nn.knn",
    "eval.linear": "nn.linear_probe",
    "batch": "data.batch",
    "shards": "data.shards",
    "checkpoint": "io.checkpoint",
    "sources": "io.sources",
    "hub": "io.hub",
    "tracking": "io.tracking",
    "plots": "io.plots",
    "export": "io.export",
    "engine": "train.engine",
    "rundir": "train.rundir",
    "pretrained": "train.pretrained",
    "eval.online": "train.online",
    "flops": "analysis.flops",
}
# ``mimlab.data`` and ``mimlab.train`` are packages now; their old names are reachable from the
# packages themselves (``from mimlab.data import build_dataset``, ``from mimlab.train import
# pretrain``).


class _MovedFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds ``mimlab.<old>`` and hands out the module at its new path."""

    def find_spec(
        self, fullname: str, path: Optional[Sequence[str]], target: Optional[ModuleType] = None
    ) -> Optional[importlib.machinery.ModuleSpec]:
        root, _, rest = fullname.partition(".")
        if root != "mimlab" or rest not in MOVED:
            return None
        return importlib.machinery.ModuleSpec(fullname, self)

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType:
        module = importlib.import_module("mimlab." + MOVED[spec.name.partition(".")[2]])
        spec.loader_state = module.__spec__  # the import system overwrites __spec__: restored below
        return module

    def exec_module(self, module: ModuleType) -> None:
        """The module ran under its own name already; give it back its own spec."""
        alias = module.__spec__
        if alias is not None and alias.loader_state is not None:
            module.__spec__ = alias.loader_state


def install() -> None:
    """Put the finder on ``sys.meta_path`` once (after the regular finders)."""
    if not any(isinstance(f, _MovedFinder) for f in sys.meta_path):
        sys.meta_path.append(_MovedFinder())
