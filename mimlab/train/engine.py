"""The one training engine shared by every method (pretraining and fine-tuning).

AdamW (no weight decay on norms, biases and tokens; optional layer-wise lr decay),
lr = base_lr * effective_batch / 256, per-iteration cosine schedule with linear warm-up,
gradient accumulation, autocast (bf16/fp16 with a grad scaler), DistributedDataParallel or FSDP2
(``run.parallel``, :mod:`mimlab.train.fsdp`) under torchrun, atomic checkpoints with everything
needed for an exact resume (RNG states and the position inside the epoch), SIGTERM/SIGINT
handling, non-finite loss detection, CSV/JSONL and TensorBoard metrics, and a progress bar with
images/s and ETA.

The loop reads nothing from the device between log steps (``run.log_every``): loss and metric
sums, the non-finite flag and the skipped-file count stay on the device and are read by
:meth:`Engine._drain` at log steps, checkpoints and epoch ends (``tests/test_host_sync.py``
counts the reads). What that changes is in :meth:`Engine._optimizer_step` and
:meth:`Engine._drain`.
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
from ..core.config import OptimConfig, RunConfig, data_workers, to_dict
from ..core.dist import autocast_dtype  # noqa: F401  (re-exported)
from ..data.datasets import EpochSampler
from ..io import checkpoint as ckpt_format
from ..io.tracking import Sink, build_sinks
from ..nn.models import compile_blocks
from . import fsdp

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
    persistent: bool = False,
    prefetch: int = 2,
) -> DataLoader:
    """The training DataLoader of one epoch (what :class:`Engine` iterates; also used by
    ``benchmarks/bench_data.py``): seeded :class:`EpochSampler` order from sample ``start``
    on, this rank's share, full batches only, ``num_workers`` forked worker processes that
    each prepare ``prefetch`` batches ahead. ``persistent``: the workers outlive the epoch;
    :func:`next_epoch` points the same loader at another epoch (items are functions of
    (index, epoch) alone, so reused workers deliver what fresh ones would)."""
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
        persistent_workers=persistent and num_workers > 0,
        prefetch_factor=prefetch if num_workers > 0 else None,
        multiprocessing_context="fork" if num_workers > 0 and os.name == "posix" else None,
    )


def next_epoch(loader: DataLoader, epoch: int, start: int = 0) -> DataLoader:
    """Point a :func:`make_loader` loader at sample ``start`` of ``epoch`` (the next
    ``iter(loader)`` then yields that epoch; persistent workers are kept)."""
    sampler = loader.batch_sampler.sampler  # type: ignore[union-attr]
    sampler.epoch, sampler.start = epoch, start
    return loader


def _fused_adamw_on(device: torch.device) -> bool:
    """Whether this torch has a fused AdamW kernel for ``device`` (CUDA; CPU since 2.4)."""
    try:
        from torch.optim.optimizer import (  # lazy: private helper, absent in some versions
            _get_fused_kernels_supported_devices,
        )
    except ImportError:
        return device.type == "cuda"
    return device.type in _get_fused_kernels_supported_devices()


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


def default_generator(device: torch.device) -> Optional[torch.Generator]:
    """The default generator of ``device`` (the one :func:`rng_state` saves): the CPU's
    ``torch.default_generator`` or the CUDA device's; None (the device's own default) else."""
    if device.type == "cpu":
        return torch.default_generator
    if device.type == "cuda":
        torch.cuda.init()
        return torch.cuda.default_generators[
            device.index if device.index is not None else torch.cuda.current_device()
        ]
    return None


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

    The logged value of a key is its mean over the micro-batches of the window. The sums stay
    on the device as float64 tensors (float32 on MPS) and are read only by :meth:`means` and
    :meth:`state`, so adding costs no host-device sync. ``add(..., keep=flag)`` adds a
    micro-batch only where the 0-d bool ``flag`` is true (the engine drops the micro-batches of
    an optimizer step whose update was skipped for a non-finite loss); ``n`` is then a 0-d
    tensor too. ``sums`` and ``n`` are saved in checkpoints, so the first row after a resume
    averages the whole window (steps before and after the interruption), exactly as an
    uninterrupted run does. ``images`` and ``t0`` only feed images/s and are not saved.
    """

    def __init__(self) -> None:
        self.sums: dict[str, Any] = {}  # key -> 0-d tensor (or float after load)
        self.n: Any = 0  # int, or a 0-d int64 tensor once a ``keep`` flag was used
        self.images = 0
        self.t0 = time.time()

    def add(self, out: dict, images: int, keep: Optional[torch.Tensor] = None) -> None:
        for key, v in out.items():
            if torch.is_tensor(v) and v.ndim == 0:
                v = v.detach()
                v = v.to(torch.float32 if v.device.type == "mps" else torch.float64)
                if keep is not None:
                    v = torch.where(keep, v, torch.zeros_like(v))
                self.sums[key] = self.sums.get(key, 0.0) + v
        self.n = self.n + (1 if keep is None else keep.to(torch.int64))
        self.images += images

    def means(self) -> dict[str, float]:
        """Means over the window (reads the device: call at log steps only)."""
        n = max(int(self.n), 1)
        return {k: float(v) / n for k, v in self.sums.items()}

    def reset(self, now: float) -> None:
        self.sums, self.n, self.images, self.t0 = {}, 0, 0, now

    def sync_loss(self, device: torch.device) -> None:
        """Replace this rank's loss sum by the mean over ranks (a collective; no-op on one
        process), so the sums rank 0 checkpoints stand for every rank."""
        if dist.is_dist() and "loss" in self.sums:
            v = self.sums["loss"]
            t = (v if torch.is_tensor(v) else torch.tensor(v)).to(device, torch.float64)
            self.sums["loss"] = float(dist.all_reduce_mean(t.reshape(1))[0])

    def state(self) -> dict:
        return {"sums": {k: float(v) for k, v in self.sums.items()}, "n": int(self.n)}

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
    before the forward (mixup/cutmix, the teacher cache's row lookup); then a method with a
    ``sample_inputs(images, generator)`` (every :class:`~mimlab.methods.base.Method`) draws the
    step's masks and views from :attr:`generator` under ``torch.no_grad()`` and is called as
    ``method(labels=labels, **inputs)``, a pure function of its inputs; any other model as
    ``model(images, labels)``.
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
        if hasattr(dataset, "to_device"):  # a device-resident training set (data.resident)
            dataset.to_device(self.device)
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
        self.amp_dtype = autocast_dtype(run.precision, self.device)
        self.fsdp = self.world > 1 and run.parallel == "fsdp"
        if run.parallel == "fsdp" and self.world == 1:
            log.warning("run.parallel=fsdp has no effect in one process (launch with torchrun)")
        if self.fsdp:  # before the optimizer: it must hold the sharded parameters
            if eval_fn is not None or evaluators:
                raise TrainingError(
                    "run.parallel=fsdp supports pretraining without online evaluation only "
                    "(evaluation runs on unsharded modules); use run.parallel=ddp"
                )
            if self.amp_dtype == torch.float16:
                raise TrainingError(
                    "run.parallel=fsdp with fp16 (a grad scaler over sharded gradients) is not "
                    "supported: use run.precision=bf16 or fp32"
                )
            fsdp.shard(self.method, self.amp_dtype)
        self.groups = param_groups(self.method, optim.weight_decay, nd, ld, layer_id, nlayers)
        opt_groups = [{k: v for k, v in g.items() if k != "names"} for g in self.groups]
        kw = {}
        if optim.fused:
            kw = {"fused": True} if _fused_adamw_on(self.device) else {"foreach": True}
        self.optimizer = torch.optim.AdamW(
            opt_groups, lr=self.peak_lr, betas=tuple(optim.betas), **kw
        )
        # a fused AdamW skips a step given a device flag (``found_inf``), without a host read
        self._skip_on_device = bool(getattr(self.optimizer, "_step_supports_amp_scaling", False))
        self.scaler = torch.amp.GradScaler(
            self.device.type, enabled=self.amp_dtype == torch.float16
        )
        self.model: nn.Module = self.method
        if self.world > 1 and not self.fsdp:
            self.model = nn.parallel.DistributedDataParallel(
                self.method,
                device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=getattr(method, "ddp_find_unused", False),
            )
        if run.compile == "blocks":  # per block, in place: the method's Python stays eager
            log.info("run.compile=blocks: %d transformer blocks compiled", compile_blocks(method))
        elif run.compile:
            self.model = torch.compile(self.model)
        #: the generator a method's ``sample_inputs`` draws masks and views from: the
        #: device's default generator, seeded by ``run.seed`` and saved in every checkpoint
        #: (:func:`rng_state`), so a resumed run draws what the uninterrupted one would
        self.generator = default_generator(self.device)
        self.global_step = 0
        self.epoch = 0
        self.micro_in_epoch = 0  # micro-batches consumed in the current epoch (per rank)
        self.nonfinite_skipped = 0
        self.skipped_files = 0
        self.last_ckpt: Optional[Path] = None
        self._kept_loader: Optional[DataLoader] = None  # persistent workers across epochs
        # device-side bookkeeping, read only at log steps and checkpoints (:meth:`_drain`)
        dev = self.device
        self._step_bad = torch.zeros((), dtype=torch.bool, device=dev)  # this optimizer step
        self._step_outs: list[tuple[dict, int]] = []  # its micro-batches' scalars, for the log
        self._bad_steps = torch.zeros((), dtype=torch.int64, device=dev)  # since the last drain
        self._first_bad = torch.full((), -1, dtype=torch.int64, device=dev)  # step of the first
        self._bad_loss = torch.zeros((), dtype=torch.float32, device=dev)  # its loss value
        self._skipped_files_acc = torch.zeros((), dtype=torch.int64)  # on the host (CPU tensor)
        self.ckpt_dir = self.run_dir / "checkpoints"

    # ---------------------------------------------------------------- checkpoints
    def state_dict(
        self, model_state: Optional[dict] = None, rank_rngs: Optional[list] = None
    ) -> dict:
        """The checkpoint (:func:`mimlab.io.checkpoint.make`): schema fields plus every state an
        exact resume needs (``model_state``: instead of the method's own, e.g. ``{}``;
        ``rank_rngs``: every rank's :func:`rng_state` (from :meth:`save`; default this
        process's only))."""
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
            self.method.state_dict() if model_state is None else model_state,
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
        if self.fsdp:  # every rank writes its shards and its own RNG file
            path = fsdp.save(self, name, rng_state())
            if name == "last":
                self.last_ckpt = path
            return path
        rank_rngs = dist.gather_object(rng_state())  # a collective: every rank's RNG to rank 0
        path = None
        if self.main:
            self.ckpt_dir.mkdir(parents=True, exist_ok=True)
            path = self.ckpt_dir / f"{name}.pt"
            atomic_save(self.state_dict(rank_rngs=rank_rngs), path)
            if name == "last":
                self.last_ckpt = path
        dist.barrier()
        return path

    def load(self, path: str | Path) -> None:
        if Path(path).is_dir():  # a sharded checkpoint (run.parallel=fsdp)
            if not self.fsdp:
                raise TrainingError(
                    f"{path} is a sharded (FSDP) checkpoint: resume it with run.parallel=fsdp "
                    "and the same number of processes"
                )
            ck = fsdp.load(self, Path(path))
        else:
            ck = self._load_file(path)
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

    def _load_file(self, path: str | Path) -> dict:
        """A checkpoint file's model and optimizer states into this engine; a checkpoint of
        another architecture is one line naming what does not fit."""
        if self.fsdp:
            raise TrainingError(
                f"run.parallel=fsdp resumes from a sharded checkpoint directory, not {path}"
            )
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
        return ck

    # ---------------------------------------------------------------- loop
    def _loader(self, epoch: int, start_micro: int) -> DataLoader:
        """This epoch's loader: with workers, one loader whose persistent workers serve every
        epoch (:func:`next_epoch`); tar shard streams plan each epoch anew."""
        data = getattr(self.config, "data", None)
        nw = data_workers(data.num_workers) if data is not None else 0
        prefetch = data.prefetch if data is not None else 2
        start = start_micro * self.optim_cfg.batch_size * self.world
        persistent = nw > 0 and not hasattr(self.dataset, "make_loader")
        if persistent and self._kept_loader is not None:
            return next_epoch(self._kept_loader, epoch, start)
        loader = make_loader(
            self.dataset,
            self.optim_cfg.batch_size,
            self.run_cfg.seed,
            epoch,
            start=start,
            rank=self.rank,
            world=self.world,
            num_workers=nw,
            pin_memory=self.device.type == "cuda",
            persistent=persistent,
            prefetch=prefetch,
        )
        if persistent:
            self._kept_loader = loader
        return loader

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
            self._kept_loader = None  # its workers exit with it
        logger.close()
        return self._finish(result)

    # ---------------------------------------------------------------- fit steps
    def _begin(self) -> bool:
        """Check the run directory, then resume (``run.resume``) or seed; True if fresh."""
        if self.main:
            check_writable(self.run_dir)
        if self.run_cfg.resume:
            path = (
                (self.ckpt_dir / ("last.dcp" if self.fsdp else "last.pt"))
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
        across ranks on the last one). No host-device sync: the loss's finiteness is OR-ed
        into a device flag that :meth:`_optimizer_step` consumes, and the scalars the method
        returns are kept as device tensors for the log window. Returns True (every micro-batch
        runs; a non-finite loss drops the whole optimizer step's update instead)."""
        accum = self.optim_cfg.accum_steps
        self._skipped_files_acc += batch.skipped.sum()  # host tensor: no device sync
        batch = batch.to(self.device)
        if self.batch_fn is not None:
            batch = self.batch_fn(batch)
        images, labels = batch.images, batch.labels
        sample = getattr(self.method, "sample_inputs", None)
        inputs = None
        if sample is not None:  # the step's randomness (masks, views), outside forward
            with torch.no_grad():
                inputs = sample(images, self.generator)
        sync = (k == accum - 1) or self.world == 1
        ctx = contextlib.nullcontext()
        if self.fsdp:
            fsdp.set_gradient_sync(self.model, sync)
        elif not sync:
            ctx = self.model.no_sync()
        with ctx:
            with torch.autocast(
                self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None
            ):
                if inputs is None:
                    out = self.model(images, labels)
                else:
                    out = self.model(labels=labels, **inputs)
            loss = out["loss"]
            bad = ~torch.isfinite(loss.detach())
            self._bad_loss = torch.where(bad, loss.detach().float(), self._bad_loss)
            self._step_bad = self._step_bad | bad
            self.scaler.scale(loss / accum).backward()
        self.micro_in_epoch += 1
        scalars = {k: v.detach() for k, v in out.items() if torch.is_tensor(v) and v.ndim == 0}
        self._step_outs.append((scalars, images.shape[0] * self.world))  # not the big outputs
        self._images_seen += images.shape[0] * self.world
        return True

    def _optimizer_step(self) -> None:
        """Clip, step, EMA hook. A non-finite loss on any rank during this step's micro-batches
        (the device flag, max-reduced over ranks by a collective, not read on the host) makes
        the update a no-op: with a fused AdamW (``optim.fused``, the default) the flag is the
        optimizer's ``found_inf`` (parameters, moments and step count unchanged); under fp16
        it marks the gradients non-finite so the grad scaler skips the step (and backs off its
        scale); with an unfused AdamW the flag is read on the host here (one sync per step).
        The step still counts (``global_step``, lr schedule, ``after_step`` hooks: an EMA
        target takes its step towards the unchanged weights); see :meth:`_drain`."""
        bad = self._step_bad
        if self.world > 1:
            flag = bad.to(torch.float32).reshape(1)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
            bad = flag[0] > 0
        if self.scaler.is_enabled():  # fp16: the scaler's own inf check drops the step
            for p in self.method.parameters():
                if p.grad is not None:
                    p.grad.copy_(torch.where(bad, torch.full_like(p.grad, math.nan), p.grad))
                    break
        if self.optim_cfg.clip_grad:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.method.parameters(), self.optim_cfg.clip_grad)
        if self.scaler.is_enabled():
            self.scaler.step(self.optimizer)
        elif self._skip_on_device:
            self.optimizer.found_inf = bad.to(torch.float32)  # type: ignore[attr-defined]
            try:
                self.optimizer.step()
            finally:
                del self.optimizer.found_inf  # type: ignore[attr-defined]
        elif not bool(bad):  # unfused AdamW: one host read per optimizer step
            self.optimizer.step()
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        keep = ~bad
        for out, n_images in self._step_outs:
            self.window.add(out, n_images, keep=keep)
        self._step_outs = []
        self._first_bad = torch.where(
            bad & (self._first_bad < 0), self.global_step, self._first_bad
        )
        self._bad_steps = self._bad_steps + bad.to(torch.int64)
        self._step_bad = torch.zeros_like(self._step_bad)
        self.global_step += 1
        if hasattr(self.method, "after_step"):
            self.method.after_step(self.global_step, self.total_steps)

    def _drain(self) -> None:
        """Read the device-side bookkeeping (the only host-device syncs of the loop, at log
        steps, checkpoints and epoch ends): files skipped by the loader and optimizer steps
        dropped for a non-finite loss since the last drain.

        Compared with a check after every micro-batch (before this loop): a non-finite loss
        is noticed at the next log step (``run.log_every``), a checkpoint or the epoch end,
        so up to ``log_every`` steps later; every step with a non-finite loss in between
        has its update dropped (:meth:`_optimizer_step`) but still counts as a step, and
        the rest of its micro-batches still run. ``run.nonfinite_skip`` counts such steps;
        past it, :class:`NonFiniteLossError` names the first of them."""
        self.skipped_files += int(self._skipped_files_acc)
        self._skipped_files_acc.zero_()
        bad = int(self._bad_steps)
        if not bad:
            return
        first, value = int(self._first_bad), float(self._bad_loss)
        self._bad_steps.zero_()
        self._first_bad.fill_(-1)
        self.nonfinite_skipped += bad
        if self.nonfinite_skipped > self.run_cfg.nonfinite_skip:
            raise NonFiniteLossError(
                f"non-finite loss ({value}) at step {first} (epoch {self.epoch}; "
                f"{self.nonfinite_skipped} step(s) skipped in all); last good checkpoint: "
                f"{self.last_ckpt or 'none'}; try a lower optim.base_lr, a longer warm-up, "
                "optim.clip_grad=1.0 or run.precision=fp32, or run.nonfinite_skip=N to skip "
                "such batches"
            )
        log.warning(
            "non-finite loss at step %d: %d optimizer step(s) skipped (%d/%d)",
            first,
            bad,
            self.nonfinite_skipped,
            self.run_cfg.nonfinite_skip,
        )

    def _after_step(
        self, sig: _SignalCatcher, logger: MetricLogger, bar, result: FitResult
    ) -> bool:
        """Log, evaluate, checkpoint and honour signals after an optimizer step; True when
        this was the last step to run now."""
        log_now = (
            self.global_step % self.run_cfg.log_every == 0 or self.global_step == self.total_steps
        )
        if log_now:
            self._drain()
            self._log_window(logger, result, bar)
        if bar is not None:
            bar.update(1)
        self._run_evaluators(logger, result)
        save_now = (
            self.run_cfg.save_every_steps
            and self.global_step % self.run_cfg.save_every_steps == 0
            and self.micro_in_epoch < self._usable_micro()
        )
        if save_now:
            self._checkpoint("last")
        # one process: a host flag, read every step; under torchrun the ranks agree by a
        # collective with a host read, so only where the loop syncs anyway: log steps,
        # save_every_steps checkpoints and the last step of an epoch (a signal waits at most
        # until the first of them)
        stop = sig.signum is not None
        if self.world > 1:
            synced = log_now or save_now or self.micro_in_epoch >= self._usable_micro()
            stop = bool(synced) and dist.any_true(stop, self.device)
        if stop:
            self._checkpoint("last")
            logger.close()
            signum = sig.signum or signal.SIGTERM
            raise Interrupted(
                f"stopped by signal {signal.Signals(signum).name} at step {self.global_step}; "
                f"checkpoint written to {self.last_ckpt}; continue with "
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
        """:meth:`save` after reading the device bookkeeping (:meth:`_drain`) and making the
        saved loss window stand for every rank."""
        self._drain()
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
        stop = not finished and self.global_step == self.run_cfg.stop_at_step
        if epoch_done and self.run_cfg.ckpt_every and self.epoch % self.run_cfg.ckpt_every == 0:
            self._checkpoint(f"checkpoint-epoch{self.epoch}")
        # an epoch's evaluation comes before the checkpoint that marks the epoch done (and
        # before a stop at its end), so a resumed run never misses one
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
        self._checkpoint("last")
        logger.flush()
        if stop:
            log.info(
                "stopped at step %d (run.stop_at_step); resume with run.resume=auto",
                self.global_step,
            )
        return stop

    def _finish(self, result: FitResult) -> FitResult:
        self._drain()
        result.global_step, result.epochs_done = self.global_step, self.epoch
        result.seconds = time.time() - self._t_start
        result.images_per_s = self._images_seen / max(result.seconds, 1e-9)
        result.skipped_files = self.skipped_files
        result.world_size = self.world
        if not self.fsdp:  # sharded parameters have no replicas to compare
            result.ddp_max_param_divergence = dist.max_param_divergence(self.method)
        if self.skipped_files and self.main:
            log.warning("%d unreadable file(s) were skipped (data.on_bad=skip)", self.skipped_files)
        return result
