"""End-to-end fine-tuning (or supervised training from scratch): :class:`Classifier` and
:func:`finetune` (``mimlab finetune``)."""

from __future__ import annotations

import json
import logging
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.data import Mixup

from ..core import dist
from ..core.config import ConfigError, FinetuneConfig, data_workers
from ..core.dist import autocast_dtype
from ..core.stats import pack_correct
from ..data.batch import Batch
from ..data.datasets import labelled_splits
from ..methods import Method
from ..nn.models import ViTEncoder, build_encoder
from ..train.engine import Engine
from ..train.pretrained import load_encoder_weights, load_pretrained
from ..train.rundir import owns_run_dir, prepare_run, write_results
from .shape_bias import ShapeBiasError, check_cifar_classes, check_stimuli_folder, compact_result
from .shape_bias import evaluate as shape_bias_evaluate

log = logging.getLogger("mimlab")


class Classifier(Method):
    """Fine-tuning / supervised model: ViT -> mean of patch tokens -> fresh LayerNorm -> linear."""

    def __init__(self, encoder: ViTEncoder, num_classes: int, label_smoothing: float = 0.0):
        super().__init__()
        self.encoder = encoder
        # MAE fine-tuning: the encoder's final norm is replaced by fc_norm after pooling
        self.encoder.norm = nn.Identity()
        self.fc_norm = nn.LayerNorm(encoder.embed_dim, eps=1e-6)
        self.head = nn.Linear(encoder.embed_dim, num_classes)
        nn.init.trunc_normal_(self.head.weight, std=2e-5)
        nn.init.zeros_(self.head.bias)
        self.label_smoothing = label_smoothing

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """fc_norm(mean of patch tokens): [B, D]."""
        t = self.encoder.forward_features(images)
        return self.fc_norm(t[:, 1:, :].mean(1))

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))

    def forward(self, images, labels=None):
        logits = self.logits(images)
        if labels is None:
            return {"logits": logits}
        if labels.ndim == 2:  # soft targets from mixup/cutmix (already smoothed)
            loss = torch.sum(-labels * F.log_softmax(logits.float(), -1), -1).mean()
            acc = (logits.argmax(-1) == labels.argmax(-1)).float().mean()
        else:
            loss = F.cross_entropy(logits.float(), labels, label_smoothing=self.label_smoothing)
            acc = (logits.argmax(-1) == labels).float().mean()
        return {"loss": loss, "acc": acc.detach()}


@torch.no_grad()
def predict_correct(
    model: Classifier,
    ds,
    batch_size: int,
    device,
    num_workers: int = 2,
    amp_dtype: Optional[torch.dtype] = None,
) -> torch.Tensor:
    """Per-image correctness [N] (bool, dataset order) of ``model`` on ``ds`` (logits under
    autocast in ``amp_dtype`` when given)."""
    model.eval()
    dev = torch.device(device)
    loader = torch.utils.data.DataLoader(
        ds, batch_size=batch_size, num_workers=num_workers, pin_memory=dev.type == "cuda"
    )
    out = []
    for b in loader:
        with torch.autocast(dev.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            logits = model.logits(b.images.to(device, non_blocking=True))
        out.append(logits.argmax(-1).cpu() == b.labels)
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.bool)


@owns_run_dir
def _curve(run_dir, this_process: list) -> list:
    """(epoch, top-1) of every evaluation of the run, also those made before a resume (read
    back from ``metrics.jsonl``; this process's own list when the file has none)."""
    rows: dict = {}
    path = run_dir / "metrics.jsonl"
    if path.is_file():
        for line in path.read_text().splitlines():
            r = json.loads(line) if line.strip() else {}
            if r.get("kind") == "eval" and "top1" in r and "epoch" in r:
                rows[int(r["epoch"])] = round(float(r["top1"]), 4)
    for e, v in this_process:
        rows[int(e)] = v
    return [[e, rows[e]] for e in sorted(rows)]


def finetune(cfg: FinetuneConfig) -> dict:
    """Fine-tune ``finetune.pretrained`` (random init without one) with the model of
    ``cfg.model``, which must be the source's architecture: resolve the config with
    :func:`mimlab.tasks.resolve_run_config` to adopt it. Returns ``results.json`` as a dict.

    With ``finetune.shape_bias`` (a cue-conflict folder), the trained model's CIFAR-10-protocol
    shape bias (:mod:`mimlab.eval.shape_bias`) is scored after training and recorded under
    ``shape_bias``; the folder and the data set's class names are checked before training."""
    ft = cfg.finetune
    if cfg.optim.layer_decay is None:  # MAE's 0.75 for a pretrained encoder, none from scratch
        cfg.optim.layer_decay = 0.75 if ft.pretrained else 1.0
    stimuli = None
    if ft.shape_bias:  # checked before any work; scored after training
        try:
            stimuli = check_stimuli_folder(ft.shape_bias)
        except ShapeBiasError as e:
            raise ConfigError(f"finetune.shape_bias: {e}") from None
    ck = load_pretrained(cfg)
    run_dir, device = prepare_run(cfg, "finetune")
    train, val = labelled_splits(
        cfg.data,
        cfg.model.img_size,
        cfg.model.in_chans,
        cfg.run.seed,
        train_aug=True,
        label_fraction=ft.label_fraction,
    )
    nc = ft.num_classes or len(train.classes)
    if stimuli is not None:
        try:
            check_cifar_classes(train.classes)
        except ShapeBiasError as e:
            raise ConfigError(f"finetune.shape_bias: {e}") from None
    enc = build_encoder(cfg.model, mask_token=False)
    if ck is not None:
        load_encoder_weights(enc, ck)
        log.info("fine-tuning from %s", ck.description)
    else:
        log.info("fine-tuning from a random initialisation")
    model = Classifier(enc, nc, ft.label_smoothing)
    batch_fn = None
    if ft.mixup > 0 or ft.cutmix > 0:
        if cfg.optim.batch_size % 2:
            raise ConfigError("mixup/cutmix need an even optim.batch_size")
        mix = Mixup(
            mixup_alpha=ft.mixup,
            cutmix_alpha=ft.cutmix,
            prob=ft.mix_prob,
            label_smoothing=ft.label_smoothing,
            num_classes=nc,
        )

        def batch_fn(b: Batch) -> Batch:  # soft labels from timm's mixup / cutmix
            return b._replace(**dict(zip(("images", "labels"), mix(b.images, b.labels))))

    nw = data_workers(cfg.data.num_workers)
    amp = autocast_dtype(cfg.run.precision, torch.device(device))

    last_correct: list = []
    curve: list = []  # (epoch, top-1) of every evaluation
    eval_at = {int(e) for e in ft.eval_at}

    def eval_fn(m, epoch):
        if eval_at and epoch not in eval_at and epoch < cfg.optim.epochs:
            if not (ft.eval_every and epoch % ft.eval_every == 0):
                return None
        with torch.random.fork_rng(devices=[]):  # the DataLoader draws a seed: keep it out
            c = predict_correct(m, val, 256, device, nw, amp)
        last_correct[:] = [c]
        top1 = 100.0 * float(c.float().sum()) / max(len(c), 1)
        curve.append([int(epoch), round(top1, 4)])
        return {"top1": top1, "epoch": int(epoch)}

    eng = Engine(
        model,
        train,
        cfg,
        cfg.optim,
        cfg.run,
        run_dir,
        eval_fn=eval_fn,
        eval_every=1 if eval_at else ft.eval_every,
        batch_fn=batch_fn,
        device=device,
    )
    res = eng.fit()
    out = {
        "command": "finetune",
        "run_dir": str(run_dir),
        "pretrained": ft.pretrained,
        "top1": res.eval_metrics.get("top1"),
        "train_images": len(train),
        "val_images": len(val),
        "epochs": res.epochs_done,
        "steps": res.global_step,
        "seconds": round(res.seconds, 1),
        "images_per_s": round(res.images_per_s, 1),
        "label_fraction": ft.label_fraction,
        "world_size": res.world_size,
        "ddp_max_param_divergence": res.ddp_max_param_divergence,
        "layer_decay": cfg.optim.layer_decay,
        "base_lr": cfg.optim.base_lr,
        "curve": _curve(run_dir, curve),
    }
    if last_correct:  # per-image correctness for paired statistics (mimlab.core.stats)
        out["correct"] = pack_correct(last_correct[0].numpy())
    if stimuli is not None and dist.is_main():  # after training: outside the run's RNG stream
        model.eval()
        sb = shape_bias_evaluate(
            model.logits,
            stimuli,
            "cifar10",
            img_size=cfg.model.img_size,
            mean=train.mean,
            std=train.std,
            in_chans=cfg.model.in_chans,
            class_names=train.classes,
            device=device,
            batch_size=256,
        )
        out["shape_bias"] = compact_result(sb)
        log.info(
            "shape bias (CIFAR-10 protocol, %d cue-conflict images): %.3f",
            sb["images"],
            sb["shape_bias"] if sb["shape_bias"] is not None else float("nan"),
        )
    write_results(run_dir, out)
    return out
