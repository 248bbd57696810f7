"""Run directories and logging: every command writes ``run.out_dir/run.name`` with the resolved
``config.yaml``, ``log.txt`` and ``results.json`` (the engine adds metrics and checkpoints)."""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path
from typing import Any, Optional

import torch

from ..core import dist
from ..core.config import ConfigError, RunConfig, save_yaml
from ..data.datasets import default_data_path
from .engine import TrainingError, seed_everything


def make_run_dir(run: RunConfig, command: str) -> Path:
    """``run.out_dir/run.name`` (default ``<command>-<YYYYmmdd-HHMMSS>``); all ranks agree."""
    if run.name is None:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        if dist.is_dist():
            obj = [stamp]
            torch.distributed.broadcast_object_list(obj, src=0)
            stamp = obj[0]
        run.name = f"{command}-{stamp}"
    d = Path(run.out_dir) / run.name
    if dist.is_main():
        try:
            d.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise TrainingError(f"cannot create run directory {d}: {e.strerror or e}") from None
    dist.barrier()
    return d


LOG_FORMAT = ("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S")


def setup_logging(run_dir: Optional[Path] = None, verbose: bool = True) -> None:
    """The ``mimlab`` logger: rank 0 logs INFO and up to stderr (``verbose``) and to
    ``run_dir/log.txt``; other ranks (torchrun) log only warnings and errors, to stderr, in
    the same format. Nothing propagates to the root logger (whose ``basicConfig`` handler
    would print a second, unformatted copy)."""
    root = logging.getLogger("mimlab")
    main = dist.is_main()
    root.setLevel(logging.INFO if main else logging.WARNING)
    root.propagate = False
    for h in list(root.handlers):
        if getattr(h, "_mimlab", False):
            root.removeHandler(h)
    fmt = logging.Formatter(*LOG_FORMAT)
    if verbose or not main:
        sh = logging.StreamHandler(sys.stderr)
        sh.setFormatter(fmt)
        sh._mimlab = True
        root.addHandler(sh)
    if run_dir is not None and main:
        fh = logging.FileHandler(run_dir / "log.txt")
        fh.setFormatter(fmt)
        fh._mimlab = True
        root.addHandler(fh)


def prepare_run(cfg: Any, command: str) -> tuple[Path, torch.device]:
    """Start a command: device (and process group under torchrun), dataset path, run
    directory, logging, ``config.yaml``, seeds. Returns the run directory and the device."""
    device = dist.init(cfg.run.device)
    if cfg.data.path is None:
        cfg.data.path = default_data_path()
        if cfg.data.path is None:
            raise ConfigError(
                "no dataset: pass --data PATH (ImageFolder, image folder, "
                "Fashion-MNIST IDX folder, or builtin:photos)"
            )
    if cfg.run.resume == "auto" and cfg.run.name is None:
        raise ConfigError("run.resume=auto needs run.name (the run directory to continue)")
    run_dir = make_run_dir(cfg.run, command)
    setup_logging(run_dir)
    if dist.is_main():
        save_yaml(cfg, run_dir / "config.yaml")
    seed_everything(cfg.run.seed + dist.rank())
    return run_dir, device


def write_results(run_dir: Path, results: dict) -> None:
    """``run_dir/results.json`` (rank 0)."""
    if dist.is_main():
        (run_dir / "results.json").write_text(json.dumps(results, indent=2, default=str))
