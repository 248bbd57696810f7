"""Run directories and logging: every command writes ``run.out_dir/run.name`` with the resolved
``config.yaml``, ``log.txt`` and ``results.json`` (the engine adds metrics and checkpoints)."""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import shutil
import socket
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from ..core import dist
from ..core.config import ConfigError, RunConfig, save_yaml
from ..data.datasets import default_data_path
from .engine import TrainingError, seed_everything

log = logging.getLogger("mimlab")


#: what a run writes into its directory (``run.overwrite`` removes these, nothing else)
RUN_OUTPUTS = (
    "config.yaml",
    "log.txt",
    "results.json",
    "metrics.jsonl",
    "metrics.csv",
    "tb",
    "checkpoints",
    "online_eval.png",
    "mlruns",
    "mlflow_run_id",
    "wandb",
)
#: a directory holding any of these is a run (finished, stopped or running)
RUN_MARKERS = ("config.yaml", "results.json", "metrics.jsonl", "checkpoints")
LOCK_NAME = ".lock"
#: locks this process holds: run directory -> lock file (released by :func:`release_run`)
_HELD: dict[Path, Path] = {}
#: (run directory, highest folder created with it) of this process's new runs (a failed CLI
#: command removes them when they hold nothing but the run's start, see :func:`remove_if_empty`)
CREATED: list[tuple[Path, Path]] = []


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


def _read_lock(lock: Path) -> dict:
    try:
        return json.loads(lock.read_text())
    except (OSError, ValueError):
        return {}


def acquire_lock(d: Path) -> None:
    """Make ``d`` this process's: ``d/.lock`` holds the pid, host and start time. A lock held
    by a live process fails with one line naming it; a stale one (its process is gone) is
    replaced with a warning. Re-entrant within one process (the Python API)."""
    lock = d / LOCK_NAME
    me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}
    for _ in range(3):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            held = _read_lock(lock)
            pid, host = held.get("pid"), held.get("host")
            if pid == os.getpid() and host == me["host"]:
                _HELD[d] = lock
                return
            if isinstance(pid, int) and host == me["host"] and not _pid_alive(pid):
                log.warning("run directory %s: removing the stale lock of process %d", d, pid)
                with contextlib.suppress(OSError):
                    lock.unlink()
                continue
            if not held:  # being written right now, or garbage: give the writer a moment
                time.sleep(0.2)
                held = _read_lock(lock)
                if not held:
                    raise TrainingError(
                        f"run directory {d} is locked ({lock} is unreadable); if no run is "
                        f"using it, delete {lock}"
                    ) from None
                pid, host = held.get("pid"), held.get("host")
            since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(held.get("started", 0)))
            raise TrainingError(
                f"run directory {d} is in use by process {pid} on {host} (since {since}); "
                f"wait for it to finish or choose another --name (if that process is gone, "
                f"delete {lock})"
            ) from None
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(me))
        _HELD[d] = lock
        return
    raise TrainingError(f"run directory {d}: could not take the lock {lock}")


def release_run(d: Optional[Path] = None) -> None:
    """Drop this process's lock on ``d`` (default: every lock it holds)."""
    for k in [d] if d is not None else list(_HELD):
        lock = _HELD.pop(Path(k), None) if k is not None else None
        if lock is not None and _read_lock(lock).get("pid") == os.getpid():
            with contextlib.suppress(OSError):
                lock.unlink()


def owns_run_dir(fn: Callable) -> Callable:
    """Decorator of a command function (pretrain, finetune, knn, linprobe): the run
    directories it locks are released when it returns or fails (the Python API holds no lock
    after a call; a kill leaves a stale lock, which the next run replaces)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        before = set(_HELD)
        try:
            return fn(*args, **kwargs)
        finally:
            for d in set(_HELD) - before:
                release_run(d)

    return wrapper


def remove_if_empty(d: Path, top: Optional[Path] = None) -> bool:
    """Remove a run directory that holds nothing but the start of a run (``config.yaml``,
    ``log.txt``, an empty ``tb/``, the lock), then its empty parents up to ``top``; True if
    removed."""
    if not d.is_dir():
        return False
    keep = {"config.yaml", "log.txt", LOCK_NAME, "tb"}
    for p in d.iterdir():
        if p.name not in keep:
            return False
        if p.name == "tb" and any(p.iterdir()):
            return False
    shutil.rmtree(d, ignore_errors=True)
    if top is not None and top != d and top in d.parents:
        p = d.parent
        while True:
            try:
                p.rmdir()  # only if empty
            except OSError:
                break
            if p == top:
                break
            p = p.parent
    return True


def _claim(d: Path, run: RunConfig) -> None:
    """Rank 0: lock ``d``, then refuse to reuse a directory that holds a run unless the user
    chose to (``run.resume``, or ``run.overwrite``, which removes the old run's outputs)."""
    new = not d.exists()
    top = d  # the highest folder this call creates (removed again if the run fails at once)
    while not top.parent.exists() and top.parent != top:
        top = top.parent
    try:
        d.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise TrainingError(f"cannot create run directory {d}: {e.strerror or e}") from None
    if not d.is_dir():
        raise TrainingError(f"cannot create run directory {d}: not a directory")
    if new:
        CREATED.append((d, top))
    acquire_lock(d)
    if new or not any((d / m).exists() for m in RUN_MARKERS):
        return
    has_ckpt = (d / "checkpoints" / "last.pt").is_file()
    if run.resume and (run.resume != "auto" or has_ckpt or not run.overwrite):
        return  # continue this run (resume=auto without a checkpoint starts it afresh)
    if not run.overwrite:
        release_run(d)
        state = "a finished run" if (d / "results.json").is_file() else "a run"
        raise TrainingError(
            f"run directory {d} already holds {state}; continue it with --resume auto, choose "
            "another --name, or pass --overwrite to replace it"
        )
    for name in RUN_OUTPUTS:
        p = d / name
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        elif p.exists() or p.is_symlink():
            p.unlink()
    log.warning("run.overwrite: replaced the earlier run in %s", d)


def make_run_dir(run: RunConfig, command: str) -> Path:
    """``run.out_dir/run.name`` (default ``<command>-<YYYYmmdd-HHMMSS>``), locked for this run
    (:func:`acquire_lock`); all ranks agree, and all fail with rank 0's one-line error."""
    if run.name is None:
        name = base = f"{command}-{time.strftime('%Y%m%d-%H%M%S')}"
        k = 2
        while dist.is_main() and (Path(run.out_dir) / name).exists():
            name, k = f"{base}-{k}", k + 1  # two runs started in the same second
        if dist.is_dist():
            obj = [name]
            torch.distributed.broadcast_object_list(obj, src=0)
            name = obj[0]
        run.name = name
    d = Path(run.out_dir) / run.name
    err = None
    if dist.is_main():
        try:
            _claim(d, run)
        except TrainingError as e:
            err = str(e)
    if dist.is_dist():
        obj = [err]
        torch.distributed.broadcast_object_list(obj, src=0)
        err = obj[0]
    if err is not None:
        raise TrainingError(err)
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
        release_run(run_dir)
