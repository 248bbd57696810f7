"""The one training engine shared by every method (pretraining and fine-tuning).

AdamW (no weight decay on norms, biases and tokens; optional layer-wise lr decay),
lr = base_lr * effective_batch / 256, per-iteration cosine schedule with linear warm-up,
gradient accumulation, autocast (bf16/fp16 with a grad scaler), DistributedDataParallel under
torchrun, atomic checkpoints with everything needed for an exact resume (RNG states and the
position inside the epoch), SIGTERM/SIGINT handling, non-finite loss detection, CSV/JSONL and
TensorBoard metrics, and a progress bar with images/s and ETA.
"""

from __future__ import annotations

import contextlib
import csv
import json
import logging
import math
import os
import random
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Protocol, Sequence

import numpy as np
import torch
import torch.nn as nn
from torch.utils.data import BatchSampler, DataLoader
from tqdm.auto import tqdm

from ..core import dist
from ..core.config import OptimConfig, RunConfig, to_dict
from ..core.dist import autocast_dtype  # noqa: F401  (re-exported)
from ..data.datasets import EpochSampler
from ..io import checkpoint as ckpt_format
from ..io.tracking import Sink, build_sinks

log = logging.getLogger("mimlab.engine")


class TrainingError(RuntimeError):
    """Training stopped for a reason the user can act on (message says how)."""


class NonFiniteLossError(TrainingError):
    pass


class Interrupted(TrainingError):
    """SIGTERM/SIGINT received; a checkpoint was written. ``exit_code`` is 128 + signal."""

    def __init__(self, msg: str, exit_code: int):
        super().__init__(msg)
        self.exit_code = exit_code


# ------------------------------------------------------------------------- pure helpers
def effective_lr(optim: OptimConfig, eff_batch: int) -> float:
    """Absolute lr: ``optim.lr`` if given, else ``base_lr * eff_batch / 256`` (linear scaling)."""
    return optim.lr if optim.lr is not None else optim.base_lr * eff_batch / 256


def lr_at(step: int, total_steps: int, warmup_steps: int, peak: float, min_lr: float) -> float:
    """Linear warm-up from 0 to ``peak`` over ``warmup_steps``, then half-cosine to ``min_lr``
    at ``total_steps`` (evaluated per iteration)."""
    if warmup_steps > 0 and step < warmup_steps:
        return peak * step / warmup_steps
    if total_steps <= warmup_steps:
        return peak
    t = min(1.0, (step - warmup_steps) / (total_steps - warmup_steps))
    return min_lr + (peak - min_lr) * 0.5 * (1.0 + math.cos(math.pi * t))


def param_groups(
    model: nn.Module,
    weight_decay: float,
    no_decay_names: set[str] = frozenset(),
    layer_decay: float = 1.0,
    layer_id: Optional[Callable[[str], int]] = None,
    num_layers: int = 0,
) -> list[dict]:
    """AdamW groups: 1-D params (norms, biases) and ``no_decay_names`` get no weight decay;
    with ``layer_decay < 1`` each group carries ``lr_scale = layer_decay ** (L - layer_id)``."""
    groups: dict[tuple, dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        no_wd = p.ndim <= 1 or name in no_decay_names or name.endswith(".bias")
        lid = layer_id(name) if (layer_id is not None and layer_decay < 1.0) else num_layers
        scale = layer_decay ** (num_layers - lid) if layer_decay < 1.0 else 1.0
        key = (no_wd, lid)
        if key not in groups:
            groups[key] = {
                "params": [],
                "weight_decay": 0.0 if no_wd else weight_decay,
                "lr_scale": scale,
                "names": [],
            }
        groups[key]["params"].append(p)
        groups[key]["names"].append(name)
    return list(groups.values())


def git_version() -> str:
    """Short git commit of the source tree, or 'unknown' (see :func:`checkpoint.git_commit`)."""
    return ckpt_format.git_commit()


def make_loader(
    dataset,
    batch_size: int,
    seed: int,
    epoch: int,
    start: int = 0,
    rank: int = 0,
    world: int = 1,
    num_workers: int = 0,
    pin_memory: bool = False,
) -> DataLoader:
    """The training DataLoader of one epoch (what :class:`Engine` iterates; also used by
    ``benchmarks/bench_data.py``): seeded :class:`EpochSampler` order from sample ``start``
    on, this rank's share, full batches only, ``num_workers`` forked worker processes."""
    if hasattr(dataset, "make_loader"):  # tar shard streams plan the epoch themselves
        return dataset.make_loader(
            batch_size, seed, epoch, start, rank, world, num_workers, pin_memory
        )
    sampler = EpochSampler(len(dataset), seed, epoch, rank, world, start=start)
    bs = BatchSampler(sampler, batch_size, drop_last=True)
    # a private generator: creating a loader must not consume the global RNG (which drives
    # masking and dropout), or a resumed run would diverge from an uninterrupted one
    gen = torch.Generator().manual_seed(seed * 1000 + epoch)
    return DataLoader(
        dataset,
        batch_sampler=bs,
        num_workers=num_workers,
        generator=gen,
        pin_memory=pin_memory,
        persistent_workers=False,
        multiprocessing_context="fork" if num_workers > 0 and os.name == "posix" else None,
    )


def rng_state() -> dict:
    np_state = np.random.get_state()
    st = {
        "torch": torch.get_rng_state(),
        "numpy": [
            np_state[0],
            torch.from_numpy(np_state[1].astype(np.int64)),
            int(np_state[2]),
            int(np_state[3]),
            float(np_state[4]),
        ],
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(st: dict) -> None:
    torch.set_rng_state(st["torch"])
    n = st["numpy"]
    np.random.set_state((n[0], n[1].numpy().astype(np.uint32), n[2], n[3], n[4]))
    py = st["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def atomic_save(obj: Any, path: Path) -> None:
    """Write to ``path.tmp`` then rename: a crash never leaves a partial file at ``path``
    (:func:`mimlab.io.checkpoint.save`; errors as :class:`TrainingError`)."""
    try:
        ckpt_format.save(obj, path)
    except ckpt_format.CheckpointError as e:
        raise TrainingError(str(e)) from None


def load_checkpoint(path: str | Path, trust: bool = False) -> dict:
    """Read a checkpoint file as stored (``weights_only=True`` unless ``trust``), errors as
    :class:`TrainingError`. Readers of the *schema* use :func:`mimlab.io.checkpoint.load`."""
    try:
        return ckpt_format.read(path, trust)
    except ckpt_format.CheckpointError as e:
        raise TrainingError(str(e)) from None


def check_writable(d: Path) -> None:
    try:
        d.mkdir(parents=True, exist_ok=True)
        probe = d / ".write-test"
        probe.write_bytes(b"0" * 1024)
        probe.unlink()
    except OSError as e:
        raise TrainingError(f"run directory {d} is not writable: {e.strerror or e}") from None


# ------------------------------------------------------------------------- metrics
class MetricLogger:
    """metrics.jsonl (append-only, the source of truth), metrics.csv, TensorBoard."""

    def __init__(
        self,
        run_dir: Path,
        enabled: bool,
        resume_step: Optional[int] = None,
        sinks: Sequence[Sink] = (),
    ):
        self.enabled = enabled
        self.jsonl = run_dir / "metrics.jsonl"
        self.csv = run_dir / "metrics.csv"
        self.tb = None
        self.sinks = list(sinks)  # optional W&B / MLflow (mimlab.io.tracking), rank 0 only
        if not enabled:
            return
        if resume_step is not None and self.jsonl.exists():
            # drop rows logged after the checkpoint we resume from
            keep = [
                ln
                for ln in self.jsonl.read_text().splitlines()
                if ln.strip() and json.loads(ln).get("step", 0) <= resume_step
            ]
            self.jsonl.write_text("".join(k + "\n" for k in keep))
        try:
            from torch.utils.tensorboard import SummaryWriter  # lazy: ~1 s import, rank 0 only

            self.tb = SummaryWriter(str(run_dir / "tb"))
        except Exception as e:  # noqa: BLE001
            log.warning("TensorBoard logging disabled: %s", e)

    def log(self, step: int, metrics: dict[str, float], prefix: str = "train") -> None:
        if not self.enabled:
            return
        row = {"step": step, "kind": prefix, **{k: float(v) for k, v in metrics.items()}}
        with open(self.jsonl, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self.tb is not None:
            for k, v in metrics.items():
                self.tb.add_scalar(f"{prefix}/{k}", float(v), step)
        for s in self.sinks:
            s.log(step, metrics, prefix)

    def rows(self) -> list[dict]:
        if not self.jsonl.exists():
            return []
        return [json.loads(ln) for ln in self.jsonl.read_text().splitlines() if ln.strip()]

    def flush(self) -> None:
        if not self.enabled:
            return
        rows = self.rows()
        keys: list[str] = []
        for r in rows:
            keys += [k for k in r if k not in keys]
        with open(self.csv, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=keys)
            w.writeheader()
            for r in rows:
                w.writerow(r)
        if self.tb is not None:
            self.tb.flush()

    def close(self) -> None:
        self.flush()
        if self.tb is not None:
            self.tb.close()
        for s in self.sinks:
            s.close()
        self.sinks = []


class LogWindow:
    """Running sums of a method's scalar outputs since the last logged row.

    The logged value of a key is its mean over the micro-batches of the window. ``sums`` and
    ``n`` are saved in checkpoints, so the first row after a resume averages the whole window
    (steps before and after the interruption), exactly as an uninterrupted run does. ``images``
    and ``t0`` only feed images/s and are not saved.
    """

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.n = 0
        self.images = 0
        self.t0 = time.time()

    def add(self, out: dict, images: int) -> None:
        for key, v in out.items():
            if torch.is_tensor(v) and v.ndim == 0:
                self.sums[key] = self.sums.get(key, 0.0) + float(v.detach())
        self.n += 1
        self.images += images

    def means(self) -> dict[str, float]:
        return {k: v / max(self.n, 1) for k, v in self.sums.items()}

    def reset(self, now: float) -> None:
        self.sums, self.n, self.images, self.t0 = {}, 0, 0, now

    def sync_loss(self, device: torch.device) -> None:
        """Replace this rank's loss sum by the mean over ranks (a collective; no-op on one
        process), so the sums rank 0 checkpoints stand for every rank."""
        if dist.is_dist() and "loss" in self.sums:
            t = torch.tensor([self.sums["loss"]], dtype=torch.float64, device=device)
            self.sums["loss"] = float(dist.all_reduce_mean(t))

    def state(self) -> dict:
        return {"sums": dict(self.sums), "n": self.n}

    def load(self, st: Optional[dict]) -> None:
        """Restore ``state()``; checkpoints written before the window was saved restore an
        empty window (the first row then averages only the steps after the resume)."""
        st = st or {}
        self.sums = {str(k): float(v) for k, v in st.get("sums", {}).items()}
        self.n = int(st.get("n", 0))


class Evaluator(Protocol):
    """A callback run during training every ``every`` optimizer steps (and at the start and
    the end), e.g. :class:`mimlab.train.online.OnlineKNN`. Called on every rank with the
    unwrapped module (it may use collectives and must leave the RNG and train/eval flags as it
    found them); the metrics returned on rank 0 are logged with kind ``kind``, then
    ``plot(rows of that kind)`` may redraw a figure."""

    kind: str
    every: int

    def __call__(self, module: nn.Module, step: int) -> dict[str, float]: ...

    def plot(self, rows: list[dict]) -> None: ...


# ------------------------------------------------------------------------- engine
@dataclass
class FitResult:
    run_dir: Path
    global_step: int
    epochs_done: int
    last_metrics: dict = field(default_factory=dict)
    eval_metrics: dict = field(default_factory=dict)
    seconds: float = 0.0
    images_per_s: float = 0.0
    skipped_files: int = 0
    world_size: int = 1
    ddp_max_param_divergence: float = 0.0
    online_metrics: dict = field(default_factory=dict)  # last row of each evaluator, by kind


class _SignalCatcher:
    def __init__(self):
        self.signum: Optional[int] = None
        self._old: dict = {}

    def __enter__(self):
        try:
            for s in (signal.SIGTERM, signal.SIGINT):
                self._old[s] = signal.signal(s, self._handle)
        except ValueError:  # not in the main thread
            pass
        return self

    def _handle(self, signum, frame):
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # second Ctrl-C: stop now
        self.signum = signum

    def __exit__(self, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)


class Engine:
    """Train ``method`` on ``dataset`` (items :class:`mimlab.data.batch.Batch`).

    ``config`` is the resolved top-level config (saved into every checkpoint); ``optim`` and
    ``run`` are its sections. ``eval_fn(model, epoch) -> dict`` runs on rank 0 after epochs
    (every ``eval_every`` epochs and at the end; it may return None to skip an epoch).
    ``batch_fn(batch) -> batch`` transforms a :class:`~mimlab.data.batch.Batch` on the device
    before the forward (mixup/cutmix, the teacher cache's row lookup); the method is called as
    ``method(images, labels)``.
    ``evaluators`` run every ``ev.every`` optimizer steps (see :class:`Evaluator`).
    ``total_steps`` caps the run at that many optimizer steps (an iteration budget; the caller
    sets ``optim.epochs`` high enough); ``lr_fn(step, total_steps, peak_lr, min_lr) -> lr``
    replaces the warm-up + cosine schedule (e.g. the poly schedule of segmentation).
    """

    def __init__(
        self,
        method: nn.Module,
        dataset,
        config: Any,
        optim: OptimConfig,
        run: RunConfig,
        run_dir: Path,
        eval_fn: Optional[Callable] = None,
        eval_every: int = 0,
        batch_fn: Optional[Callable] = None,
        device: Optional[torch.device] = None,
        layer_decay_fn=None,
        evaluators: Sequence[Evaluator] = (),
        total_steps: Optional[int] = None,
        lr_fn: Optional[Callable[[int, int, float, float], float]] = None,
    ):
        self.device = device or dist.init(run.device)
        self.method, self.dataset, self.config = method.to(self.device), dataset, config
        self.optim_cfg, self.run_cfg, self.run_dir = optim, run, Path(run_dir)
        self.eval_fn, self.eval_every, self.batch_fn = eval_fn, eval_every, batch_fn
        self.evaluators = list(evaluators)
        self.window = LogWindow()
        self.lr = 0.0  # lr of the current optimizer step (logged)
        self.world, self.rank = dist.world_size(), dist.rank()
        self.main = self.rank == 0
        self.eff_batch = optim.batch_size * optim.accum_steps * self.world
        self.peak_lr = effective_lr(optim, self.eff_batch)
        per_rank = len(dataset) // self.world
        self.micro_per_epoch = per_rank // optim.batch_size
        self.steps_per_epoch = self.micro_per_epoch // optim.accum_steps
        if self.steps_per_epoch < 1:
            raise TrainingError(
                f"dataset of {len(dataset)} images is smaller than one optimizer step "
                f"(batch {optim.batch_size} x accum {optim.accum_steps} x {self.world} "
                "processes); lower optim.batch_size or raise data.repeat"
            )
        self.total_steps = self.steps_per_epoch * optim.epochs
        if total_steps is not None:  # an iteration budget (segmentation recipes)
            self.total_steps = min(self.total_steps, total_steps)
        if run.max_steps is not None:
            self.total_steps = min(self.total_steps, run.max_steps)
        self.lr_fn = lr_fn
        self.warmup_steps = int(round(optim.warmup_epochs * self.steps_per_epoch))
        nd = method.no_weight_decay() if hasattr(method, "no_weight_decay") else set()
        enc = getattr(method, "encoder", None)
        layer_id, nlayers = None, 0
        ld = 1.0 if optim.layer_decay is None else optim.layer_decay  # None: resolved by caller
        if ld < 1.0 and enc is not None and hasattr(enc, "layer_id"):
            layer_id = layer_decay_fn or (
                lambda n: (
                    enc.layer_id(n[len("encoder.") :])
                    if n.startswith("encoder.")
                    else enc.depth + 1
                )
            )
            nlayers = enc.depth + 1
        self.groups = param_groups(self.method, optim.weight_decay, nd, ld, layer_id, nlayers)
        opt_groups = [{k: v for k, v in g.items() if k != "names"} for g in self.groups]
        kw = {}
        if optim.fused:
            kw = {"fused": True} if self.device.type == "cuda" else {"foreach": True}
        self.optimizer = torch.optim.AdamW(
            opt_groups, lr=self.peak_lr, betas=tuple(optim.betas), **kw
        )
        self.amp_dtype = autocast_dtype(run.precision, self.device)
        self.scaler = torch.amp.GradScaler(
            self.device.type, enabled=self.amp_dtype == torch.float16
        )
        self.model: nn.Module = self.method
        if self.world > 1:
            self.model = nn.parallel.DistributedDataParallel(
                self.method,
                device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=getattr(method, "ddp_find_unused", False),
            )
        if run.compile:
            self.model = torch.compile(self.model)
        self.global_step = 0
        self.epoch = 0
        self.micro_in_epoch = 0  # micro-batches consumed in the current epoch (per rank)
        self.nonfinite_skipped = 0
        self.skipped_files = 0
        self.last_ckpt: Optional[Path] = None
        self.ckpt_dir = self.run_dir / "checkpoints"

    # ---------------------------------------------------------------- checkpoints
    def state_dict(self, rank_rngs: Optional[list] = None) -> dict:
        """The checkpoint (:func:`mimlab.io.checkpoint.make`): schema fields plus every state an
        exact resume needs. ``rank_rngs``: every rank's :func:`rng_state` (from :meth:`save`;
        default this process's only)."""
        cfg = to_dict(self.config)
        kind = ckpt_format.kind_of_config(cfg)
        method = (
            (cfg.get("method") or {}).get("name")
            if kind == "pretrain"
            else (cfg.get("finetune") or {}).get("pretrained")
        )
        mean = getattr(self.dataset, "mean", None) or getattr(self.method, "data_mean", None)
        std = getattr(self.dataset, "std", None) or getattr(self.method, "data_std", None)
        return ckpt_format.make(
            kind,
            cfg,
            self.method.state_dict(),
            method=method,
            data_mean=mean,
            data_std=std,
            **self._engine_states(rank_rngs),
        )

    def _engine_states(self, rank_rngs: Optional[list] = None) -> dict:
        return {
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "global_step": self.global_step,
            "epoch": self.epoch,
            "micro_in_epoch": self.micro_in_epoch,
            "samples_in_epoch": self.micro_in_epoch * self.optim_cfg.batch_size * self.world,
            "world_size": self.world,
            "nonfinite_skipped": self.nonfinite_skipped,
            "skipped_files": self.skipped_files,
            "log_window": self.window.state(),
            "rng": rng_state(),
            # each rank's RNG (masking noise, dropout differ per rank): exact resume under DDP
            "rng_ranks": rank_rngs if rank_rngs is not None else [rng_state()],
        }

    def save(self, name: str = "last") -> Optional[Path]:
        rank_rngs = dist.gather_object(rng_state())  # a collective: every rank's RNG to rank 0
        path = None
        if self.main:
            self.ckpt_dir.mkdir(parents=True, exist_ok=True)
            path = self.ckpt_dir / f"{name}.pt"
            atomic_save(self.state_dict(rank_rngs), path)
            if name == "last":
                self.last_ckpt = path
        dist.barrier()
        return path

    def load(self, path: str | Path) -> None:
        ck = load_checkpoint(path, trust=self.run_cfg.trust_checkpoints)
        if not isinstance(ck, dict) or not isinstance(ck.get("model"), dict):
            raise TrainingError(f"{path} is not a mimlab training checkpoint (no 'model' state)")
        own = self.method.state_dict()
        shape = [
            f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}"
            for k, v in ck["model"].items()
            if k in own and hasattr(v, "shape") and own[k].shape != v.shape
        ]
        missing = [k for k in own if k not in ck["model"]]
        unexpected = [k for k in ck["model"] if k not in own]
        if shape or missing or unexpected:
            parts = [
                f"shape mismatches (checkpoint vs model): {', '.join(shape[:4])}" if shape else "",
                f"missing: {', '.join(missing[:6])}" if missing else "",
                f"unexpected: {', '.join(unexpected[:6])}" if unexpected else "",
            ]
            raise TrainingError(
                f"checkpoint {path} does not fit this model ("
                + "; ".join(p for p in parts if p)
                + "); resume needs the run's own model.* and method.* settings"
            )
        self.method.load_state_dict(ck["model"], strict=True)
        self.optimizer.load_state_dict(ck["optimizer"])
        self.scaler.load_state_dict(ck["scaler"])
        self.global_step = int(ck["global_step"])
        self.epoch = int(ck["epoch"])
        self.nonfinite_skipped = int(ck.get("nonfinite_skipped", 0))
        self.skipped_files = int(ck.get("skipped_files", 0))
        self.window.load(ck.get("log_window"))
        samples = int(ck.get("samples_in_epoch", 0))
        if samples % (self.optim_cfg.batch_size * self.world):
            raise TrainingError(
                f"cannot resume mid-epoch: {samples} samples consumed is not a multiple of the "
                f"new global micro-batch ({self.optim_cfg.batch_size} x {self.world})"
            )
        self.micro_in_epoch = samples // (self.optim_cfg.batch_size * self.world)
        if self.micro_in_epoch >= self.micro_per_epoch:
            self.epoch, self.micro_in_epoch = self.epoch + 1, 0
        ranks = ck.get("rng_ranks") or [ck["rng"]]  # older files: rank 0's state only
        if int(ck.get("world_size", 1)) == self.world:  # each rank its own RNG (masking noise)
            set_rng_state(ranks[self.rank] if len(ranks) == self.world else ranks[0])
        else:  # a different number of processes: each rank re-seeds from (seed, step, rank)
            seed_everything(self.run_cfg.seed + 1000003 * self.global_step + self.rank)
        self.last_ckpt = Path(path)

    # ---------------------------------------------------------------- loop
    def _loader(self, epoch: int, start_micro: int) -> DataLoader:
        nw = getattr(self.config, "data", None)
        nw = nw.num_workers if nw is not None else 0
        return make_loader(
            self.dataset,
            self.optim_cfg.batch_size,
            self.run_cfg.seed,
            epoch,
            start=start_micro * self.optim_cfg.batch_size * self.world,
            rank=self.rank,
            world=self.world,
            num_workers=nw,
            pin_memory=self.device.type == "cuda",
        )

    def _set_lr(self) -> float:
        if self.lr_fn is not None:
            lr = self.lr_fn(self.global_step, self.total_steps, self.peak_lr, self.optim_cfg.min_lr)
            for g in self.optimizer.param_groups:
                g["lr"] = lr * g.get("lr_scale", 1.0)
            return lr
        lr = lr_at(
            self.global_step,
            self.total_steps,
            self.warmup_steps,
            self.peak_lr,
            self.optim_cfg.min_lr,
        )
        for g in self.optimizer.param_groups:
            g["lr"] = lr * g.get("lr_scale", 1.0)
        return lr

    def _nonfinite(self, loss: torch.Tensor) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        self.nonfinite_skipped += 1
        if self.nonfinite_skipped > self.run_cfg.nonfinite_skip:
            raise NonFiniteLossError(
                f"non-finite loss ({loss.item()}) at step {self.global_step} (epoch "
                f"{self.epoch}); last good checkpoint: {self.last_ckpt or 'none'}; try a lower "
                "optim.base_lr, a longer warm-up, optim.clip_grad=1.0 or run.precision=fp32, or "
                "run.nonfinite_skip=N to skip such batches"
            )
        log.warning(
            "non-finite loss at step %d: batch skipped (%d/%d)",
            self.global_step,
            self.nonfinite_skipped,
            self.run_cfg.nonfinite_skip,
        )

    def _usable_micro(self) -> int:
        """Micro-batches of an epoch that form whole optimizer steps (the rest is dropped)."""
        return self.micro_per_epoch - (self.micro_per_epoch % self.optim_cfg.accum_steps)

    def fit(self) -> FitResult:
        """Train to ``total_steps`` (or ``run.stop_at_step``); returns a :class:`FitResult`.

        Steps: resume or seed, open the metric sinks, then epochs of micro-batches
        (:meth:`_micro_step`), optimizer steps (:meth:`_optimizer_step`) and the per-step
        bookkeeping (:meth:`_after_step`: log, evaluators, checkpoints, signals), and
        :meth:`_end_epoch` (checkpoints, epoch evaluation)."""
        fresh = self._begin()
        logger = self._open_logger()
        result = FitResult(self.run_dir, self.global_step, self.epoch)
        bar = self._progress_bar()
        self._t_start, self._images_seen = time.time(), 0
        self.window.t0 = time.time()
        try:
            with _SignalCatcher() as sig:
                self.method.train()
                if fresh:
                    self._run_evaluators(logger, result, at_start=True)
                while self.epoch < self.optim_cfg.epochs and self.global_step < self.total_steps:
                    if self._run_epoch(sig, logger, bar, result):
                        break
        finally:
            if bar is not None:
                bar.close()
        logger.close()
        return self._finish(result)

    # ---------------------------------------------------------------- fit steps
    def _begin(self) -> bool:
        """Check the run directory, then resume (``run.resume``) or seed; True if fresh."""
        if self.main:
            check_writable(self.run_dir)
        if self.run_cfg.resume:
            path = (
                (self.ckpt_dir / "last.pt")
                if self.run_cfg.resume == "auto"
                else Path(self.run_cfg.resume)
            )
            if path.exists() or self.run_cfg.resume != "auto":
                self.load(path)
                if self.main:
                    log.info(
                        "resumed from %s at step %d (epoch %d, batch %d)",
                        path,
                        self.global_step,
                        self.epoch,
                        self.micro_in_epoch,
                    )
                return False
        seed_everything(self.run_cfg.seed + self.rank)
        return True

    def _open_logger(self) -> MetricLogger:
        sinks = (
            build_sinks(getattr(self.config, "log", None), self.run_dir, to_dict(self.config))
            if self.main
            else []
        )
        return MetricLogger(
            self.run_dir,
            self.main,
            sinks=sinks,
            resume_step=self.global_step if self.run_cfg.resume else None,
        )

    def _progress_bar(self):
        if not (self.main and self.run_cfg.progress):
            return None
        return tqdm(
            total=self.total_steps,
            initial=self.global_step,
            unit="step",
            dynamic_ncols=True,
            desc=self.run_dir.name,
            mininterval=1.0,
        )

    def _run_epoch(self, sig: _SignalCatcher, logger: MetricLogger, bar, result: FitResult) -> bool:
        """The rest of the current epoch; True when training must stop (run.stop_at_step)."""
        accum = self.optim_cfg.accum_steps
        loader = self._loader(self.epoch, self.micro_in_epoch)
        it = iter(loader)
        while self.micro_in_epoch < self._usable_micro():
            k = self.micro_in_epoch % accum
            if k == 0:
                self.lr = self._set_lr()
            batch = next(it, None)
            if batch is None:
                break
            if not self._micro_step(batch, k, it) or k != accum - 1:
                continue
            self._optimizer_step()
            if self._after_step(sig, logger, bar, result):
                break
        del it, loader
        return self._end_epoch(logger, result)

    def _micro_step(self, batch, k: int, it) -> bool:
        """Forward + backward of micro-batch ``k`` of an optimizer step (gradients synced
        across ranks on the last one). A non-finite loss on any rank drops the rest of the
        optimizer step's micro-batches and returns False."""
        accum = self.optim_cfg.accum_steps
        batch = batch.to(self.device)
        self.skipped_files += int(batch.skipped.sum())
        if self.batch_fn is not None:
            batch = self.batch_fn(batch)
        images, labels = batch.images, batch.labels
        sync = (k == accum - 1) or self.world == 1
        ctx = self.model.no_sync() if not sync else contextlib.nullcontext()
        with ctx:
            with torch.autocast(
                self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None
            ):
                out = self.model(images, labels)
            loss = out["loss"]
            if dist.any_true(not bool(torch.isfinite(loss.detach())), self.device):
                for _ in range(accum - k - 1):
                    next(it, None)  # keep the loader aligned with the count
                self.micro_in_epoch += accum - k
                self._nonfinite(loss)
                return False
            self.scaler.scale(loss / accum).backward()
        self.micro_in_epoch += 1
        self.window.add(out, images.shape[0] * self.world)
        self._images_seen += images.shape[0] * self.world
        return True

    def _optimizer_step(self) -> None:
        if self.optim_cfg.clip_grad:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.method.parameters(), self.optim_cfg.clip_grad)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.global_step += 1
        if hasattr(self.method, "after_step"):
            self.method.after_step(self.global_step, self.total_steps)

    def _after_step(
        self, sig: _SignalCatcher, logger: MetricLogger, bar, result: FitResult
    ) -> bool:
        """Log, evaluate, checkpoint and honour signals after an optimizer step; True when
        this was the last step to run now."""
        if self.global_step % self.run_cfg.log_every == 0 or self.global_step == self.total_steps:
            self._log_window(logger, result, bar)
        if bar is not None:
            bar.update(1)
        self._run_evaluators(logger, result)
        if (
            self.run_cfg.save_every_steps
            and self.global_step % self.run_cfg.save_every_steps == 0
            and self.micro_in_epoch < self._usable_micro()
        ):
            self._checkpoint("last")
        if dist.any_true(sig.signum is not None, self.device):
            self._checkpoint("last")
            logger.close()
            signum = sig.signum or signal.SIGTERM
            raise Interrupted(
                f"stopped by signal {signal.Signals(signum).name} at step {self.global_step}; "
                f"checkpoint written to {self.ckpt_dir / 'last.pt'}; continue with "
                "run.resume=auto (same run directory)",
                128 + int(signum),
            )
        return self.global_step >= self.total_steps or self.global_step == self.run_cfg.stop_at_step

    def _log_window(self, logger: MetricLogger, result: FitResult, bar) -> None:
        """One 'train' row: window means (loss averaged over ranks), lr, epoch, images/s."""
        now = time.time()
        ips = self.window.images / max(now - self.window.t0, 1e-9)
        metrics = self.window.means()
        t = torch.tensor([metrics.get("loss", 0.0)], device=self.device)
        metrics["loss"] = float(dist.all_reduce_mean(t))
        metrics.update(
            lr=self.lr,
            epoch=self.epoch + self.micro_in_epoch / self.micro_per_epoch,
            images_per_s=ips,
        )
        logger.log(self.global_step, metrics)
        result.last_metrics = metrics
        self.window.reset(now)
        if bar is not None:
            bar.set_postfix(
                loss=f"{metrics['loss']:.4f}",
                lr=f"{self.lr:.2e}",
                img_s=f"{ips:.0f}",
                ep=self.epoch,
            )

    def _run_evaluators(
        self, logger: MetricLogger, result: FitResult, at_start: bool = False
    ) -> None:
        """Evaluators due at this step (every ``ev.every`` steps, at the start of a fresh run
        and at the last step); their time is kept out of the images/s window."""
        due = [
            ev
            for ev in self.evaluators
            if ev.every > 0
            and (
                at_start or self.global_step % ev.every == 0 or self.global_step == self.total_steps
            )
        ]
        if not due:
            return
        t0 = time.time()
        for ev in due:
            metrics = ev(self.method, self.global_step)
            if self.main and metrics:
                metrics = {**metrics, "images_seen": self.global_step * self.eff_batch}
                logger.log(self.global_step, metrics, prefix=ev.kind)
                result.online_metrics[ev.kind] = metrics
                log.info(
                    "step %d %s: %s",
                    self.global_step,
                    ev.kind,
                    ", ".join(f"{k} {v:.4g}" for k, v in metrics.items()),
                )
                ev.plot([r for r in logger.rows() if r.get("kind") == ev.kind])
        logger.flush()
        self.window.t0 += time.time() - t0

    def _checkpoint(self, name: str) -> None:
        """:meth:`save` after making the saved loss window stand for every rank."""
        self.window.sync_loss(self.device)
        self.save(name)

    def _end_epoch(self, logger: MetricLogger, result: FitResult) -> bool:
        """After the loop over an epoch's batches: advance the epoch if it is complete, write
        checkpoints, run ``eval_fn`` when due; True when run.stop_at_step stops the run."""
        epoch_done = self.micro_in_epoch >= self._usable_micro()
        if epoch_done:
            self.epoch += 1
            self.micro_in_epoch = 0
        finished = self.epoch >= self.optim_cfg.epochs or self.global_step >= self.total_steps
        if not finished and self.global_step == self.run_cfg.stop_at_step:
            self._checkpoint("last")
            log.info(
                "stopped at step %d (run.stop_at_step); resume with run.resume=auto",
                self.global_step,
            )
            return True
        if epoch_done and self.run_cfg.ckpt_every and self.epoch % self.run_cfg.ckpt_every == 0:
            self._checkpoint(f"checkpoint-epoch{self.epoch}")
        self._checkpoint("last")
        if self.eval_fn is not None and (
            finished or (self.eval_every and epoch_done and self.epoch % self.eval_every == 0)
        ):
            metrics = self.eval_fn(self.method, self.epoch) if self.main else None
            if metrics is not None:  # None: the evaluator skips this epoch
                result.eval_metrics = metrics
                logger.log(self.global_step, metrics, prefix="eval")
                log.info("epoch %d eval: %s", self.epoch, metrics)
            dist.barrier()
            self.method.train()
        logger.flush()
        return False

    def _finish(self, result: FitResult) -> FitResult:
        result.global_step, result.epochs_done = self.global_step, self.epoch
        result.seconds = time.time() - self._t_start
        result.images_per_s = self._images_seen / max(result.seconds, 1e-9)
        result.skipped_files = self.skipped_files
        result.world_size = self.world
        result.ddp_max_param_divergence = dist.max_param_divergence(self.method)
        if self.skipped_files and self.main:
            log.warning("%d unreadable file(s) were skipped (data.on_bad=skip)", self.skipped_files)
        return result
