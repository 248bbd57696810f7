"""Frozen-feature protocols: :func:`knn` and :func:`linprobe` (``mimlab knn | linprobe``) on
features cached once per split (:func:`frozen_features`); the classifiers themselves are the
pure functions of :mod:`.knn` and :mod:`.linear`."""

from __future__ import annotations

import logging
from typing import Optional

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from ..core import dist
from ..core.config import ProbeConfig, data_workers
from ..core.stats import pack_correct
from ..data.datasets import labelled_splits
from ..io.sources import SourceModel
from ..nn.knn import knn_classify
from ..nn.linear_probe import choose_lr, train_linear_heads
from ..nn.models import ViTEncoder, build_encoder
from ..train.pretrained import load_encoder_weights, load_pretrained
from ..train.rundir import owns_run_dir, prepare_run, write_results

log = logging.getLogger("mimlab")


@torch.no_grad()
def extract_features(
    feature_fn: nn.Module,
    ds,
    device,
    batch_size: int = 256,
    num_workers: int = 2,
    progress: bool = True,
    amp_dtype: Optional[torch.dtype] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Frozen features [n, D] = ``feature_fn(images)`` (float32; computed under autocast in
    ``amp_dtype`` when given, see :func:`mimlab.core.dist.autocast_dtype`) and labels [n], in
    eval mode."""
    feature_fn.eval().to(device)
    dev = torch.device(device)
    loader = torch.utils.data.DataLoader(
        ds,
        batch_size=batch_size,
        num_workers=num_workers,
        pin_memory=dev.type == "cuda",
        prefetch_factor=4 if num_workers > 0 else None,
    )
    feats, labels = [], []
    it = loader
    if progress and dist.is_main():
        it = tqdm(loader, desc="features", unit="batch", leave=False)
    for b in it:
        with torch.autocast(dev.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            f = feature_fn(b.images.to(device, non_blocking=True))
        feats.append(f.float().cpu())
        labels.append(b.labels)
    return torch.cat(feats), torch.cat(labels)


class _SourceFeatures(nn.Module):
    """Frozen features of a model whose norm comes after average pooling (fine-tuned /
    supervised checkpoints): fc_norm(mean of patch tokens)."""

    def __init__(self, sm: SourceModel):
        super().__init__()
        self.sm = sm

    def forward(self, x):
        return self.sm.features(x, "avg")


class _Pooled(nn.Module):
    def __init__(self, enc: ViTEncoder, pool: str):
        super().__init__()
        self.enc, self.pool = enc, pool

    def forward(self, x):
        return self.enc.pool(self.enc.forward_features(x), self.pool)


def _probe_encoder(cfg: ProbeConfig, device, ck: Optional[SourceModel]) -> nn.Module:
    """``x -> [B, D]`` frozen feature function for probing (encoder + pooling); ``ck`` is the
    loaded ``probe.pretrained`` source (None for a random initialisation). Models with a norm
    after pooling (fine-tuned / supervised checkpoints, timm ``fc_norm`` models) give
    fc_norm(mean of patch tokens)."""
    enc = build_encoder(cfg.model, mask_token=False)
    if ck is not None:
        log.info("frozen features of %s", ck.description)
    if ck is not None and ck.fc_norm is not None:
        return _SourceFeatures(ck).to(device)
    if ck is not None:
        load_encoder_weights(enc, ck)
    pool = cfg.probe.feature
    return _Pooled(enc, pool).to(device)


def frozen_features(cfg: ProbeConfig, command: str):
    """Shared set-up of the frozen-feature protocols: run dir, datasets (no augmentation) and
    cached features of the train and held-out splits. ``cfg.model`` must be the architecture
    of ``probe.pretrained`` (:func:`mimlab.tasks.resolve_run_config` adopts it)."""
    ck = load_pretrained(cfg)
    run_dir, device = prepare_run(cfg, command)
    train, val = labelled_splits(
        cfg.data,
        cfg.model.img_size,
        cfg.model.in_chans,
        cfg.run.seed,
        train_aug=False,
        label_fraction=cfg.probe.label_fraction,
    )
    fn = _probe_encoder(cfg, device, ck)
    nw, prog = data_workers(cfg.data.num_workers), cfg.run.progress
    amp = dist.autocast_dtype(cfg.run.precision, torch.device(device))
    return (
        run_dir,
        train,
        val,
        extract_features(fn, train, device, num_workers=nw, progress=prog, amp_dtype=amp),
        extract_features(fn, val, device, num_workers=nw, progress=prog, amp_dtype=amp),
    )


@owns_run_dir
def knn(cfg: ProbeConfig) -> dict:
    """Weighted k-NN on frozen features; returns ``results.json`` as a dict."""
    run_dir, train, val, (ftr, ytr), (fte, yte) = frozen_features(cfg, "knn")
    nc = len(train.classes)
    pred = knn_classify(ftr, ytr, fte, cfg.probe.k, cfg.probe.temperature, nc)
    top1 = 100.0 * float((pred == yte).float().mean())
    out = {
        "command": "knn",
        "run_dir": str(run_dir),
        "pretrained": cfg.probe.pretrained,
        "top1": top1,
        "k": cfg.probe.k,
        "temperature": cfg.probe.temperature,
        "feature": cfg.probe.feature,
        "train_images": len(train),
        "val_images": len(val),
        "correct": pack_correct((pred == yte).numpy()),
    }
    write_results(run_dir, out)
    log.info("k-NN top-1 %.2f%%", top1)
    return out


@owns_run_dir
def linprobe(cfg: ProbeConfig) -> dict:
    """Linear probe on frozen features (every lr of ``probe.lrs`` in one pass, extended past the
    grid's edge per ``probe.lr_extend``); returns ``results.json`` as a dict."""
    run_dir, train, val, (ftr, ytr), (fte, yte) = frozen_features(cfg, "linprobe")
    nc = len(train.classes)
    # choose the lr on 10 % of the training features, then retrain on all and test once
    g = torch.Generator().manual_seed(cfg.run.seed)
    perm = torch.randperm(len(ftr), generator=g)
    n_hold = max(1, len(ftr) // 10)
    hold, fit = perm[:n_hold], perm[n_hold:]
    p = cfg.probe
    sel_acc = choose_lr(
        ftr[fit],
        ytr[fit],
        ftr[hold],
        ytr[hold],
        nc,
        p.lrs,
        p.epochs,
        p.batch_size,
        p.weight_decay,
        cfg.run.seed,
        p.lr_extend,
    )
    best_lr = max(sel_acc, key=sel_acc.get)
    final = train_linear_heads(
        ftr, ytr, fte, nc, list(sel_acc), p.epochs, p.batch_size, p.weight_decay, cfg.run.seed
    )
    test_acc = {
        lr: 100.0 * float((lg.argmax(-1) == yte).float().mean()) for lr, lg in final.items()
    }
    out = {
        "command": "linprobe",
        "run_dir": str(run_dir),
        "pretrained": p.pretrained,
        "top1": test_acc[best_lr],
        "best_lr": best_lr,
        "holdout_top1_per_lr": {str(k): v for k, v in sel_acc.items()},
        "lr_extend": p.lr_extend,
        "test_top1_per_lr": {str(k): v for k, v in test_acc.items()},
        "feature": p.feature,
        "train_images": len(train),
        "val_images": len(val),
        "correct": pack_correct((final[best_lr].argmax(-1) == yte).numpy()),
    }
    write_results(run_dir, out)
    log.info(
        "linear probe top-1 %.2f%% (lr %g chosen on held-out training features)",
        test_acc[best_lr],
        best_lr,
    )
    return out
