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
import json
import logging
import math
import os
import random
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
import torch.nn as nn
from torch.utils.data import BatchSampler, DataLoader

from . import __version__
from . import dist
from .config import OptimConfig, RunConfig, to_dict
from .data import EpochSampler

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


def param_groups(model: nn.Module, weight_decay: float, no_decay_names: set[str] = frozenset(),
                 layer_decay: float = 1.0, layer_id: Optional[Callable[[str], int]] = None,
                 num_layers: int = 0) -> list[dict]:
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
            groups[key] = {"params": [], "weight_decay": 0.0 if no_wd else weight_decay,
                           "lr_scale": scale, "names": []}
        groups[key]["params"].append(p)
        groups[key]["names"].append(name)
    return list(groups.values())


def git_version() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=5, cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or "unknown"
    except Exception:  # noqa: BLE001 - best effort
        return "unknown"


def make_loader(dataset, batch_size: int, seed: int, epoch: int, start: int = 0, rank: int = 0,
                world: int = 1, num_workers: int = 0, pin_memory: bool = False) -> DataLoader:
    """The training DataLoader of one epoch (what :class:`Engine` iterates; also used by
    ``benchmarks/bench_data.py``): seeded :class:`EpochSampler` order from sample ``start``
    on, this rank's share, full batches only, ``num_workers`` forked worker processes."""
    sampler = EpochSampler(len(dataset), seed, epoch, rank, world, start=start)
    bs = BatchSampler(sampler, batch_size, drop_last=True)
    # a private generator: creating a loader must not consume the global RNG (which drives
    # masking and dropout), or a resumed run would diverge from an uninterrupted one
    gen = torch.Generator().manual_seed(seed * 1000 + epoch)
    return DataLoader(dataset, batch_sampler=bs, num_workers=num_workers, generator=gen,
                      pin_memory=pin_memory, persistent_workers=False,
                      multiprocessing_context="fork" if num_workers > 0 and os.name == "posix"
                      else None)


def rng_state() -> dict:
    np_state = np.random.get_state()
    st = {"torch": torch.get_rng_state(),
          "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), int(np_state[2]),
                    int(np_state[3]), float(np_state[4])],
          "python": random.getstate()}
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
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


def atomic_save(obj: Any, path: Path) -> None:
    """Write to ``path.tmp`` then rename: a crash never leaves a partial file at ``path``."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        torch.save(obj, tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise TrainingError(f"could not write checkpoint {path}: {e.strerror or e} "
                            "(disk full or not writable?); the previous checkpoint is intact") from None


def load_checkpoint(path: str | Path, trust: bool = False) -> dict:
    """Load a mimlab checkpoint with ``weights_only=True`` unless ``trust``."""
    p = Path(path)
    if not p.is_file():
        raise TrainingError(f"checkpoint not found: {p}")
    try:
        return torch.load(p, map_location="cpu", weights_only=not trust)
    except Exception as e:  # noqa: BLE001
        raise TrainingError(f"could not load checkpoint {p}: {type(e).__name__}: "
                            f"{str(e).splitlines()[0] if str(e) else ''}") from None


def check_writable(d: Path) -> None:
    try:
        d.mkdir(parents=True, exist_ok=True)
        probe = d / ".write-test"
        probe.write_bytes(b"0" * 1024)
        probe.unlink()
    except OSError as e:
        raise TrainingError(f"run directory {d} is not writable: {e.strerror or e}") from None


def autocast_dtype(precision: str, device: torch.device) -> Optional[torch.dtype]:
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if precision == "fp16":
        return torch.float16
    # auto: bf16 on GPUs that support it, full precision on CPU
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return None


# ------------------------------------------------------------------------- metrics
class MetricLogger:
    """metrics.jsonl (append-only, the source of truth), metrics.csv, TensorBoard."""

    def __init__(self, run_dir: Path, enabled: bool, resume_step: Optional[int] = None):
        self.enabled = enabled
        self.jsonl = run_dir / "metrics.jsonl"
        self.csv = run_dir / "metrics.csv"
        self.tb = None
        if not enabled:
            return
        if resume_step is not None and self.jsonl.exists():
            # drop rows logged after the checkpoint we resume from
            keep = [ln for ln in self.jsonl.read_text().splitlines()
                    if ln.strip() and json.loads(ln).get("step", 0) <= resume_step]
            self.jsonl.write_text("".join(k + "\n" for k in keep))
        try:
            from torch.utils.tensorboard import SummaryWriter
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
        import csv
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
    """Train ``method`` on ``dataset`` (items ``(image, label, n_skipped)``).

    ``config`` is the resolved top-level config (saved into every checkpoint); ``optim`` and
    ``run`` are its sections. ``eval_fn(model, epoch) -> dict`` runs on rank 0 after epochs
    (every ``eval_every`` epochs and at the end). ``batch_fn(images, labels) -> (images, labels)``
    transforms a batch on the device before the forward (mixup/cutmix).
    """

    def __init__(self, method: nn.Module, dataset, config: Any, optim: OptimConfig,
                 run: RunConfig, run_dir: Path, eval_fn: Optional[Callable] = None,
                 eval_every: int = 0, batch_fn: Optional[Callable] = None,
                 device: Optional[torch.device] = None, layer_decay_fn=None):
        self.device = device or dist.init(run.device)
        self.method, self.dataset, self.config = method.to(self.device), dataset, config
        self.optim_cfg, self.run_cfg, self.run_dir = optim, run, Path(run_dir)
        self.eval_fn, self.eval_every, self.batch_fn = eval_fn, eval_every, batch_fn
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
                "processes); lower optim.batch_size or raise data.repeat")
        self.total_steps = self.steps_per_epoch * optim.epochs
        if run.max_steps is not None:
            self.total_steps = min(self.total_steps, run.max_steps)
        self.warmup_steps = int(round(optim.warmup_epochs * self.steps_per_epoch))
        nd = method.no_weight_decay() if hasattr(method, "no_weight_decay") else set()
        enc = getattr(method, "encoder", None)
        layer_id, nlayers = None, 0
        if optim.layer_decay < 1.0 and enc is not None and hasattr(enc, "layer_id"):
            layer_id = layer_decay_fn or (lambda n: enc.layer_id(n[len("encoder."):])
                                          if n.startswith("encoder.") else enc.depth + 1)
            nlayers = enc.depth + 1
        self.groups = param_groups(self.method, optim.weight_decay, nd, optim.layer_decay,
                                   layer_id, nlayers)
        opt_groups = [{k: v for k, v in g.items() if k != "names"} for g in self.groups]
        kw = {}
        if optim.fused:
            kw = {"fused": True} if self.device.type == "cuda" else {"foreach": True}
        self.optimizer = torch.optim.AdamW(opt_groups, lr=self.peak_lr, betas=tuple(optim.betas),
                                           **kw)
        self.amp_dtype = autocast_dtype(run.precision, self.device)
        self.scaler = torch.amp.GradScaler(self.device.type,
                                           enabled=self.amp_dtype == torch.float16)
        self.model: nn.Module = self.method
        if self.world > 1:
            self.model = nn.parallel.DistributedDataParallel(
                self.method, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=getattr(method, "ddp_find_unused", False))
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
    def state_dict(self) -> dict:
        return {
            "model": self.method.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "global_step": self.global_step,
            "epoch": self.epoch,
            "micro_in_epoch": self.micro_in_epoch,
            "samples_in_epoch": self.micro_in_epoch * self.optim_cfg.batch_size * self.world,
            "world_size": self.world,
            "nonfinite_skipped": self.nonfinite_skipped,
            "skipped_files": self.skipped_files,
            "rng": rng_state(),
            "config": to_dict(self.config),
            "version": {"mimlab": __version__, "git": git_version(),
                        "torch": str(torch.__version__)},
        }

    def save(self, name: str = "last") -> Optional[Path]:
        path = None
        if self.main:
            self.ckpt_dir.mkdir(parents=True, exist_ok=True)
            path = self.ckpt_dir / f"{name}.pt"
            atomic_save(self.state_dict(), path)
            if name == "last":
                self.last_ckpt = path
        dist.barrier()
        return path

    def load(self, path: str | Path) -> None:
        ck = load_checkpoint(path, trust=self.run_cfg.trust_checkpoints)
        missing, unexpected = self.method.load_state_dict(ck["model"], strict=False)
        if missing or unexpected:
            raise TrainingError(f"checkpoint {path} does not match this model: missing "
                                f"{list(missing)[:8]}, unexpected {list(unexpected)[:8]}")
        self.optimizer.load_state_dict(ck["optimizer"])
        self.scaler.load_state_dict(ck["scaler"])
        self.global_step = int(ck["global_step"])
        self.epoch = int(ck["epoch"])
        self.nonfinite_skipped = int(ck.get("nonfinite_skipped", 0))
        self.skipped_files = int(ck.get("skipped_files", 0))
        samples = int(ck.get("samples_in_epoch", 0))
        if samples % (self.optim_cfg.batch_size * self.world):
            raise TrainingError(
                f"cannot resume mid-epoch: {samples} samples consumed is not a multiple of the "
                f"new global micro-batch ({self.optim_cfg.batch_size} x {self.world})")
        self.micro_in_epoch = samples // (self.optim_cfg.batch_size * self.world)
        if self.micro_in_epoch >= self.micro_per_epoch:
            self.epoch, self.micro_in_epoch = self.epoch + 1, 0
        if int(ck.get("world_size", 1)) == self.world:
            set_rng_state(ck["rng"])
        else:  # a different number of processes: each rank re-seeds from (seed, step, rank)
            seed_everything(self.run_cfg.seed + 1000003 * self.global_step + self.rank)
        self.last_ckpt = Path(path)

    # ---------------------------------------------------------------- loop
    def _loader(self, epoch: int, start_micro: int) -> DataLoader:
        nw = getattr(self.config, "data", None)
        nw = nw.num_workers if nw is not None else 0
        return make_loader(self.dataset, self.optim_cfg.batch_size, self.run_cfg.seed, epoch,
                           start=start_micro * self.optim_cfg.batch_size * self.world,
                           rank=self.rank, world=self.world, num_workers=nw,
                           pin_memory=self.device.type == "cuda")

    def _set_lr(self) -> float:
        lr = lr_at(self.global_step, self.total_steps, self.warmup_steps, self.peak_lr,
                   self.optim_cfg.min_lr)
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
                "run.nonfinite_skip=N to skip such batches")
        log.warning("non-finite loss at step %d: batch skipped (%d/%d)", self.global_step,
                    self.nonfinite_skipped, self.run_cfg.nonfinite_skip)

    def fit(self) -> FitResult:
        if self.main:
            check_writable(self.run_dir)
        if self.run_cfg.resume:
            path = (self.ckpt_dir / "last.pt") if self.run_cfg.resume == "auto" \
                else Path(self.run_cfg.resume)
            if path.exists() or self.run_cfg.resume != "auto":
                self.load(path)
                if self.main:
                    log.info("resumed from %s at step %d (epoch %d, batch %d)", path,
                             self.global_step, self.epoch, self.micro_in_epoch)
            else:
                seed_everything(self.run_cfg.seed + self.rank)
        else:
            seed_everything(self.run_cfg.seed + self.rank)
        logger = MetricLogger(self.run_dir, self.main,
                              resume_step=self.global_step if self.run_cfg.resume else None)
        result = FitResult(self.run_dir, self.global_step, self.epoch)
        bar = None
        if self.main and self.run_cfg.progress:
            from tqdm.auto import tqdm
            bar = tqdm(total=self.total_steps, initial=self.global_step, unit="step",
                       dynamic_ncols=True, desc=self.run_dir.name, mininterval=1.0)
        accum = self.optim_cfg.accum_steps
        t_start, images_seen = time.time(), 0
        win_t, win_imgs = time.time(), 0
        eval_metrics: dict = {}
        try:
            with _SignalCatcher() as sig:
                self.method.train()
                while self.epoch < self.optim_cfg.epochs and self.global_step < self.total_steps:
                    loader = self._loader(self.epoch, self.micro_in_epoch)
                    it = iter(loader)
                    sums: dict[str, float] = {}
                    nsum = 0
                    while self.micro_in_epoch < self.micro_per_epoch - (self.micro_per_epoch % accum):
                        k = self.micro_in_epoch % accum
                        if k == 0:
                            lr = self._set_lr()
                        try:
                            images, labels, nbad = next(it)
                        except StopIteration:
                            break
                        images = images.to(self.device, non_blocking=True)
                        labels = labels.to(self.device, non_blocking=True)
                        self.skipped_files += int(nbad.sum())
                        if self.batch_fn is not None:
                            images, labels = self.batch_fn(images, labels)
                        sync = (k == accum - 1) or self.world == 1
                        ctx = self.model.no_sync() if (not sync and self.world > 1) else \
                            contextlib.nullcontext()
                        with ctx:
                            with torch.autocast(self.device.type, dtype=self.amp_dtype,
                                                enabled=self.amp_dtype is not None):
                                out = self.model(images, labels)
                            loss = out["loss"]
                            bad = dist.any_true(not bool(torch.isfinite(loss.detach())), self.device)
                            if bad:  # drop the rest of this optimizer step's micro-batches
                                for _ in range(accum - k - 1):
                                    next(it, None)  # keep the loader aligned with the count
                                self.micro_in_epoch += accum - k
                                self._nonfinite(loss)
                                continue
                            self.scaler.scale(loss / accum).backward()
                        for key, v in out.items():
                            if torch.is_tensor(v) and v.ndim == 0:
                                sums[key] = sums.get(key, 0.0) + float(v.detach())
                        nsum += 1
                        self.micro_in_epoch += 1
                        images_seen += images.shape[0] * self.world
                        win_imgs += images.shape[0] * self.world
                        if k != accum - 1:
                            continue
                        # ---- optimizer step
                        if self.optim_cfg.clip_grad:
                            self.scaler.unscale_(self.optimizer)
                            nn.utils.clip_grad_norm_(self.method.parameters(),
                                                     self.optim_cfg.clip_grad)
                        self.scaler.step(self.optimizer)
                        self.scaler.update()
                        self.optimizer.zero_grad(set_to_none=True)
                        self.global_step += 1
                        self.method.after_step(self.global_step, self.total_steps) \
                            if hasattr(self.method, "after_step") else None
                        if self.global_step % self.run_cfg.log_every == 0 or \
                                self.global_step == self.total_steps:
                            now = time.time()
                            ips = win_imgs / max(now - win_t, 1e-9)
                            win_t, win_imgs = now, 0
                            metrics = {k2: v2 / max(nsum, 1) for k2, v2 in sums.items()}
                            t = torch.tensor([metrics.get("loss", 0.0)], device=self.device)
                            metrics["loss"] = float(dist.all_reduce_mean(t))
                            metrics.update(lr=lr, epoch=self.epoch + self.micro_in_epoch /
                                           self.micro_per_epoch, images_per_s=ips)
                            logger.log(self.global_step, metrics)
                            result.last_metrics = metrics
                            sums, nsum = {}, 0
                            if bar is not None:
                                bar.set_postfix(loss=f"{metrics['loss']:.4f}", lr=f"{lr:.2e}",
                                                img_s=f"{ips:.0f}", ep=self.epoch)
                        if bar is not None:
                            bar.update(1)
                        if self.run_cfg.save_every_steps and \
                                self.global_step % self.run_cfg.save_every_steps == 0 and \
                                self.micro_in_epoch < self.micro_per_epoch - (
                                    self.micro_per_epoch % accum):
                            self.save("last")
                        if dist.any_true(sig.signum is not None, self.device):
                            self.save("last")
                            logger.close()
                            signum = sig.signum or signal.SIGTERM
                            raise Interrupted(
                                f"stopped by signal {signal.Signals(signum).name} at step "
                                f"{self.global_step}; checkpoint written to "
                                f"{self.ckpt_dir / 'last.pt'}; continue with run.resume=auto "
                                f"(same run directory)", 128 + int(signum))
                        if self.global_step >= self.total_steps or \
                                self.global_step == self.run_cfg.stop_at_step:
                            break
                    del it, loader
                    epoch_done = self.micro_in_epoch >= self.micro_per_epoch - (
                        self.micro_per_epoch % accum)
                    if epoch_done:
                        self.epoch += 1
                        self.micro_in_epoch = 0
                    finished = self.epoch >= self.optim_cfg.epochs or \
                        self.global_step >= self.total_steps
                    if not finished and self.global_step == self.run_cfg.stop_at_step:
                        self.save("last")
                        log.info("stopped at step %d (run.stop_at_step); resume with "
                                 "run.resume=auto", self.global_step)
                        break
                    if epoch_done and self.run_cfg.ckpt_every and \
                            self.epoch % self.run_cfg.ckpt_every == 0:
                        self.save(f"checkpoint-epoch{self.epoch}")
                    self.save("last")
                    if self.eval_fn is not None and (finished or (
                            self.eval_every and epoch_done and self.epoch % self.eval_every == 0)):
                        if self.main:
                            eval_metrics = self.eval_fn(self.method, self.epoch)
                            logger.log(self.global_step, eval_metrics, prefix="eval")
                            log.info("epoch %d eval: %s", self.epoch, eval_metrics)
                        dist.barrier()
                        self.method.train()
                    logger.flush()
        finally:
            if bar is not None:
                bar.close()
        logger.close()
        result.global_step, result.epochs_done = self.global_step, self.epoch
        result.eval_metrics = eval_metrics
        result.seconds = time.time() - t_start
        result.images_per_s = images_seen / max(result.seconds, 1e-9)
        result.skipped_files = self.skipped_files
        result.world_size = self.world
        result.ddp_max_param_divergence = dist.max_param_divergence(self.method)
        if self.skipped_files and self.main:
            log.warning("%d unreadable file(s) were skipped (data.on_bad=skip)",
                        self.skipped_files)
        return result
