"""Online evaluation during pretraining: weighted k-NN (and optionally a linear probe) on a
fixed, labelled subset, every ``eval.online_every`` optimizer steps.

A fixed bank of ``eval.online_bank`` training images and ``eval.online_queries`` held-out
images (evaluation transform, seeded, class-balanced) are encoded by the current encoder
(eval mode, no gradients, pooled features); queries are classified by k-NN against the bank
(:func:`mimlab.nn.knn.knn_classify`) and, with ``eval.online_probe=true``, by linear heads
trained on the cached bank features (:func:`mimlab.nn.linear_probe.probe_top1`).

Guarantees:
  * the training RNG is untouched: CPU/CUDA torch, ``random`` and numpy states are restored,
    the loaders use private generators, and the modules' train/eval flags are put back, so a
    run's losses are bitwise the same with online evaluation on or off;
  * under DDP every rank encodes a strided share of the images and the features are
    all-gathered, so every rank holds the same features in dataset order and the result does
    not depend on the number of processes; the scores are computed on rank 0.

:class:`OnlineKNN` is an evaluator callback of :class:`mimlab.train.engine.Engine` (``kind``,
``every``, ``__call__(module, step) -> metrics``, ``plot(rows)``); the curve is drawn to
``online_eval.png`` in the run directory from the logged rows, so it continues across a resume.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import random
import time
from pathlib import Path
from typing import Callable, Iterator, Optional

import numpy as np
import torch
import torch.nn as nn
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from torch.utils.data import DataLoader, Dataset, Subset

from ..core import dist
from ..core.config import ConfigError, DataConfig, EvalConfig, ModelConfig, data_workers
from ..data.datasets import DataError, build_dataset, subset_indices
from ..nn.knn import knn_classify, top1
from ..nn.linear_probe import probe_top1

FeatureFn = Callable[[nn.Module, torch.Tensor], torch.Tensor]


def pooled_encoder_features(pool: str = "avg") -> FeatureFn:
    """``(method, images [B, C, H, W]) -> [B, D]``: the method's encoder on full images, final
    norm, then mean of patch tokens ('avg') or the class token ('cls')."""

    def fn(method: nn.Module, x: torch.Tensor) -> torch.Tensor:
        enc = method.encoder
        return enc.pool(enc.forward_features(x), pool)

    return fn


@contextlib.contextmanager
def isolated(module: nn.Module, device: torch.device) -> Iterator[None]:
    """Run evaluation code without side effects on training: every RNG state (torch CPU and
    this CUDA device, ``random``, numpy) and every submodule's train/eval flag is restored on
    exit; ``module`` is in eval mode and gradients are off inside."""
    flags = [(m, m.training) for m in module.modules()]
    py, npy = random.getstate(), np.random.get_state()
    devices = [device.index or 0] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices), torch.no_grad():
            module.eval()
            yield
    finally:
        for m, t in flags:
            m.training = t
        random.setstate(py)
        np.random.set_state(npy)


def _gather_in_order(x: torch.Tensor, n: int) -> torch.Tensor:
    """Rank r holds rows r, r + W, r + 2W, ... of an n-row tensor; return all n rows in order
    on every rank (padded all_gather). ``x`` [n_r, ...] -> [n, ...]."""
    world = dist.world_size()
    if world == 1:
        return x
    per = -(-n // world)  # ceil(n / W)
    pad = torch.zeros((per - len(x), *x.shape[1:]), dtype=x.dtype, device=x.device)
    parts = [torch.empty((per, *x.shape[1:]), dtype=x.dtype, device=x.device) for _ in range(world)]
    torch.distributed.all_gather(parts, torch.cat([x, pad]))
    out = torch.empty((n, *x.shape[1:]), dtype=x.dtype, device=x.device)
    for r, p in enumerate(parts):
        out[r::world] = p[: len(range(r, n, world))]
    return out


class OnlineKNN:
    """k-NN (+ linear probe) evaluator on a fixed labelled bank / query subset.

    ``bank``, ``queries``: datasets of ``(image [C, H, W], label, n_skipped)`` with the
    evaluation transform. Returns ``{"knn_top1", ["probe_top1", "probe_lr"], "eval_s"}`` on
    rank 0 and ``{}`` on the other ranks.
    """

    kind = "online"

    def __init__(
        self,
        bank: Dataset,
        queries: Dataset,
        num_classes: int,
        every: int,
        k: int = 20,
        temperature: float = 0.07,
        probe: bool = False,
        probe_lrs: tuple[float, ...] = (0.3, 0.1, 0.03, 0.01, 0.003),
        probe_epochs: int = 50,
        seed: int = 0,
        device: Optional[torch.device] = None,
        batch_size: int = 256,
        num_workers: int = 0,
        amp_dtype: Optional[torch.dtype] = None,
        features: Optional[FeatureFn] = None,
        plot_path: Optional[Path] = None,
    ):
        if len(bank) < dist.world_size() or len(queries) < dist.world_size():
            raise ConfigError(
                f"online evaluation needs at least one image per process "
                f"(bank {len(bank)}, queries {len(queries)})"
            )
        self.bank, self.queries, self.num_classes = bank, queries, num_classes
        self.every, self.k, self.temperature = every, k, temperature
        self.probe, self.probe_lrs, self.probe_epochs = probe, list(probe_lrs), probe_epochs
        self.seed, self.device = seed, device or torch.device("cpu")
        self.batch_size, self.num_workers, self.amp_dtype = batch_size, num_workers, amp_dtype
        self.features = features or pooled_encoder_features("avg")
        self.plot_path = plot_path
        self.cache_mb = 512  # decoded bank + queries kept in memory up to this size per rank
        self._cache: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}

    def _encode(self, method: nn.Module, ds: Dataset) -> tuple[torch.Tensor, torch.Tensor]:
        """Features [n, D] (float32, CPU) and labels [n] of ``ds``, this rank's strided share
        encoded here and the rest gathered from the other ranks."""
        n = len(ds)
        feats, labels = [], []
        for x, y in self._batches(ds):
            with torch.autocast(
                self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None
            ):
                f = self.features(method, x.to(self.device, non_blocking=True))
            feats.append(f.float())
            labels.append(y.to(self.device))
        f = _gather_in_order(torch.cat(feats), n)  # [n, D]
        y = _gather_in_order(torch.cat(labels), n)  # [n]
        return f.cpu(), y.cpu()

    def _batches(self, ds: Dataset) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """This rank's strided share of ``ds`` as (images, labels) batches, decoded once and
        kept in memory when it takes at most ``cache_mb`` MB (the transform is fixed)."""
        if id(ds) in self._cache:
            return self._cache[id(ds)]
        rank, world = dist.rank(), dist.world_size()
        part = Subset(ds, list(range(rank, len(ds), world)))
        loader = DataLoader(
            part,
            batch_size=self.batch_size,
            num_workers=self.num_workers,
            generator=torch.Generator().manual_seed(self.seed),
        )
        batches = [(b.images, b.labels) for b in loader]
        if sum(x.numel() * x.element_size() for x, _ in batches) <= self.cache_mb * 2**20:
            self._cache[id(ds)] = batches
        return batches

    def __call__(self, method: nn.Module, step: int) -> dict[str, float]:
        t0 = time.time()
        with isolated(method, self.device):
            fb, yb = self._encode(method, self.bank)
            fq, yq = self._encode(method, self.queries)
        if not dist.is_main():
            return {}
        pred = knn_classify(fb, yb, fq, self.k, self.temperature, self.num_classes)
        out = {"knn_top1": top1(pred, yq)}
        if self.probe:
            with torch.random.fork_rng(devices=[]):  # belt and braces: it seeds its own
                acc, lr = probe_top1(
                    fb,
                    yb,
                    fq,
                    yq,
                    self.num_classes,
                    self.probe_lrs,
                    self.probe_epochs,
                    256,
                    0.0,
                    self.seed,
                )
            out.update(probe_top1=acc, probe_lr=lr)
        out["eval_s"] = time.time() - t0
        return out

    def plot(self, rows: list[dict]) -> None:
        """Draw ``online_eval.png`` (top-1 against optimizer step) from the logged rows."""
        if self.plot_path is None or not rows:
            return
        fig = Figure(figsize=(6.0, 4.0), dpi=100)
        FigureCanvasAgg(fig)
        ax = fig.add_subplot(1, 1, 1)
        for key, label in (
            ("knn_top1", f"k-NN (k={self.k}, T={self.temperature:g})"),
            ("probe_top1", "linear probe"),
        ):
            pts = sorted((r["step"], r[key]) for r in rows if key in r)
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=3, label=label)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("top-1 (%)")
        ax.set_title(
            f"online evaluation: {len(self.bank)} bank / {len(self.queries)} held-out images",
            fontsize=10,
        )
        ax.grid(alpha=0.3)
        ax.legend(loc="best")
        fig.tight_layout()
        tmp = self.plot_path.with_name(self.plot_path.name + ".tmp.png")
        fig.savefig(tmp)
        os.replace(tmp, self.plot_path)


def build_online_evaluator(
    ev: EvalConfig,
    data: DataConfig,
    model: ModelConfig,
    seed: int,
    mean: list[float],
    std: list[float],
    device: torch.device,
    run_dir: Path,
    amp_dtype: Optional[torch.dtype] = None,
) -> Optional[OnlineKNN]:
    """The k-NN evaluator of ``eval.*`` (None when ``eval.online_every=0``).

    Bank: ``ev.online_bank`` images of the whole training split (``data.limit`` and
    ``data.repeat`` ignored; without the ``data.holdout`` part), queries: ``ev.online_queries``
    images of the held-out split (``data.val_split``, or the ``data.holdout`` part); both
    class-balanced, seeded by ``data.subset_seed`` (else ``seed``), evaluation transform with
    the pretraining data's ``mean``/``std``. No labels: one-line :class:`ConfigError`.
    """
    if ev.online_every <= 0:
        return None
    sseed = seed if data.subset_seed is None else data.subset_seed
    base = dataclasses.replace(data, limit=None, repeat=1, val_limit=None)
    try:
        sets = []
        for split, n in (("train", ev.online_bank), ("val", ev.online_queries)):
            ds = build_dataset(
                base,
                split,
                model.img_size,
                model.in_chans,
                seed,
                train_aug=False,
                labelled=True,
                mean=mean,
                std=std,
            )
            if not ds.classes or min(ds.labels) < 0:
                raise DataError(f"{data.path} has no class labels")
            sets.append(Subset(ds, subset_indices(ds.labels, n, "one_per_class", sseed)))
    except DataError as e:
        raise ConfigError(
            f"eval.online_every={ev.online_every} needs labelled data with a "
            f"held-out split: {e} (or set eval.online_every=0)"
        ) from None
    return OnlineKNN(
        sets[0],
        sets[1],
        len(sets[0].dataset.classes),
        ev.online_every,
        ev.online_k,
        ev.online_temperature,
        ev.online_probe,
        ev.online_probe_lrs,
        ev.online_probe_epochs,
        sseed,
        device,
        256,
        data_workers(data.num_workers),
        amp_dtype,
        pooled_encoder_features(ev.online_feature),
        run_dir / "online_eval.png",
    )
