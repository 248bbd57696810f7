"""Semantic segmentation fine-tuning (``mimlab segment``): :class:`Segmenter` (a ViT backbone
from any model source + a linear or UperNet head), whole-image and sliding-window inference,
mIoU / per-class IoU / pixel accuracy, coloured predictions and a figure.

Training runs on the one engine (:class:`mimlab.train.engine.Engine`): AdamW with layer-wise lr
decay, a linear warm-up then the poly schedule (:func:`mimlab.nn.segmentation.poly_lr`),
``segment.iters`` optimizer steps, pixels of the ignore value left out of the loss.
"""

from __future__ import annotations

import logging
import math
import time
from functools import partial
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from ..core.config import ConfigError, SegmentConfig
from ..core.dist import autocast_dtype
from ..data.datasets import resolve_stats
from ..data.segmentation import SegDataset, seg_splits, steps_for
from ..io.plots import pyplot
from ..methods import Method
from ..nn.models import ViTEncoder, build_encoder
from ..nn.segmentation import (
    IGNORE,
    FCNHead,
    LinearHead,
    MultiScaleNeck,
    UperNetHead,
    confusion_matrix,
    default_block_ids,
    palette,
    poly_lr,
    scores_from_confusion,
    vit_feature_maps,
)
from ..train.engine import Engine
from ..train.pretrained import load_encoder_weights, load_pretrained
from ..train.rundir import owns_run_dir, prepare_run, write_results

log = logging.getLogger("mimlab")


class Segmenter(Method):
    """ViT encoder + segmentation head; ``forward(images [B,C,H,W], labels [B,H,W])`` returns
    the cross-entropy ``loss`` (ignored pixels left out; plus ``aux_weight`` x the auxiliary
    head's), ``acc`` (pixel accuracy of the batch) and, without labels, ``logits``
    [B, K, H, W] at the input's resolution."""

    def __init__(
        self,
        encoder: ViTEncoder,
        num_classes: int,
        head: str = "upernet",
        blocks: Optional[list[int]] = None,
        channels: int = 512,
        aux_weight: float = 0.4,
    ):
        super().__init__()
        self.encoder, self.num_classes, self.head_kind = encoder, num_classes, head
        d = encoder.embed_dim
        if head == "linear":
            self.block_ids = [encoder.depth]
            self.neck = None
            self.head = LinearHead(d, num_classes)
            self.aux = None
        elif head == "upernet":
            self.block_ids = list(blocks or default_block_ids(encoder.depth))
            if max(self.block_ids) > encoder.depth:
                raise ValueError(
                    f"segment.blocks {self.block_ids} go beyond the encoder's {encoder.depth} "
                    "blocks"
                )
            self.neck = MultiScaleNeck(d)
            self.head = UperNetHead([d] * 4, num_classes, channels)
            self.aux = FCNHead(d, num_classes) if aux_weight > 0 else None
        else:
            raise ValueError(f"unknown segmentation head '{head}' (linear | upernet)")
        self.aux_weight = aux_weight
        # blocks after the last one read get no gradient: DDP must be told
        self.ddp_find_unused = max(self.block_ids) < encoder.depth
        if head == "upernet":  # the final norm is unused: keep it out of DDP's unused set
            self.encoder.norm = nn.Identity()

    def maps(self, images: torch.Tensor) -> list[torch.Tensor]:
        feats = vit_feature_maps(
            self.encoder, images, self.block_ids, final_norm=self.head_kind == "linear"
        )
        return self.neck(feats) if self.neck is not None else feats

    def logits(self, images: torch.Tensor, with_aux: bool = False):
        """Logits [B, K, H, W] upsampled bilinearly to the input (and the auxiliary ones)."""
        m = self.maps(images)
        size = images.shape[-2:]
        out = F.interpolate(self.head(m), size=size, mode="bilinear", align_corners=False)
        if not with_aux:
            return out
        aux = None
        if self.aux is not None:
            aux = F.interpolate(self.aux(m[2]), size=size, mode="bilinear", align_corners=False)
        return out, aux

    def forward(self, images, labels=None):
        if labels is None:
            return {"logits": self.logits(images)}
        out, aux = self.logits(images, with_aux=True)
        loss = F.cross_entropy(out.float(), labels, ignore_index=IGNORE)
        res = {}
        if aux is not None:
            la = F.cross_entropy(aux.float(), labels, ignore_index=IGNORE)
            res["loss_aux"] = la.detach()
            loss = loss + self.aux_weight * la
        keep = labels != IGNORE
        acc = (
            (out.argmax(1)[keep] == labels[keep]).float().mean()
            if keep.any()
            else out.new_zeros(())
        )
        return {"loss": loss, "acc": acc.detach(), **res}


# ----------------------------------------------------------------------------- inference
def _pad_to(x: torch.Tensor, mult: int, min_h: int = 0, min_w: int = 0) -> torch.Tensor:
    H, W = x.shape[-2:]
    ph = max(math.ceil(H / mult) * mult, min_h) - H
    pw = max(math.ceil(W / mult) * mult, min_w) - W
    return F.pad(x, (0, pw, 0, ph)) if (ph or pw) else x


@torch.no_grad()
def infer_whole(model: Segmenter, images: torch.Tensor) -> torch.Tensor:
    """Logits [B, K, H, W] of whole images [B, C, H, W]: padded to a multiple of the patch
    size, position embeddings resampled to that grid, padding cut off again."""
    H, W = images.shape[-2:]
    x = _pad_to(images, model.encoder.patch_size)
    return model.logits(x)[..., :H, :W]


@torch.no_grad()
def infer_slide(
    model: Segmenter, images: torch.Tensor, crop: int, stride: int, batch: int = 4
) -> torch.Tensor:
    """Logits [B, K, H, W] averaged over ``crop`` x ``crop`` windows every ``stride`` pixels
    (the last window of a row / column flush with the border; images smaller than a window are
    padded), as mmseg's slide inference."""
    B, _, H, W = images.shape
    x = _pad_to(images, 1, crop, crop)
    Hp, Wp = x.shape[-2:]
    ys = list(range(0, max(Hp - crop, 0) + 1, stride))
    xs = list(range(0, max(Wp - crop, 0) + 1, stride))
    if ys[-1] + crop < Hp:
        ys.append(Hp - crop)
    if xs[-1] + crop < Wp:
        xs.append(Wp - crop)
    boxes = [(y, xx) for y in ys for xx in xs]
    out = x.new_zeros(B, model.num_classes, Hp, Wp)
    cnt = x.new_zeros(1, 1, Hp, Wp)
    for i in range(0, len(boxes), batch):
        part = boxes[i : i + batch]
        win = torch.cat([x[:, :, y : y + crop, xx : xx + crop] for y, xx in part])
        lg = model.logits(win).float()
        for j, (y, xx) in enumerate(part):
            out[:, :, y : y + crop, xx : xx + crop] += lg[j * B : (j + 1) * B]
            cnt[:, :, y : y + crop, xx : xx + crop] += 1
    return (out / cnt)[..., :H, :W]


@torch.no_grad()
def evaluate(
    model: Segmenter,
    ds: SegDataset,
    device,
    mode: str = "whole",
    crop: int = 512,
    stride: Optional[int] = None,
    eval_batch: int = 1,
    keep: Sequence[int] = (),
    on_pred=None,
    amp_dtype: Optional[torch.dtype] = None,
) -> dict:
    """Confusion matrix over ``ds`` (predictions resized back to each mask's resolution) and
    its scores (:func:`mimlab.nn.segmentation.scores_from_confusion`); the (image index,
    prediction) pairs of the indices in ``keep`` are returned under 'kept' for figures;
    ``on_pred(i, pred)`` sees every prediction [H, W]; ``amp_dtype`` runs the model under
    autocast."""
    was = model.training
    model.eval()
    device = torch.device(device)
    K = model.num_classes
    cm = torch.zeros(K, K, dtype=torch.int64)
    stride = stride or max(1, crop * 2 // 3)
    kept = []
    keep = set(keep)
    pending: list = []

    def flush():
        imgs = torch.stack([p[1] for p in pending]).to(device)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            if mode == "slide":
                lg = infer_slide(model, imgs, crop, stride)
            else:
                lg = infer_whole(model, imgs)
        lg = lg.float()
        for (i, _, lab), one in zip(pending, lg):
            one = one[None]
            if tuple(one.shape[-2:]) != tuple(lab.shape):
                one = F.interpolate(one, size=lab.shape, mode="bilinear", align_corners=False)
            pred = one[0].argmax(0).cpu()
            cm.add_(confusion_matrix(pred, lab, K))
            if i in keep:
                kept.append((i, pred))
            if on_pred is not None:
                on_pred(i, pred)
        pending.clear()

    for i in range(len(ds)):
        b = ds[i]
        if pending and (len(pending) >= eval_batch or pending[0][1].shape != b.images.shape):
            flush()
        pending.append((i, b.images, b.labels))
    if pending:
        flush()
    model.train(was)
    return {**scores_from_confusion(cm), "confusion": cm, "kept": kept}


def colourise(pred: torch.Tensor, colours: torch.Tensor) -> np.ndarray:
    """Class ids [H, W] (IGNORE allowed) -> RGB uint8 [H, W, 3] with ``colours`` [K + 1, 3]
    (the last row for ignored pixels)."""
    idx = pred.clone()
    idx[idx == IGNORE] = colours.shape[0] - 1
    return colours[idx].numpy()


def write_figure(path: Path, ds: SegDataset, kept: list, colours: torch.Tensor) -> None:
    """predictions.png: one row per kept image: image / ground truth / prediction."""
    if not kept:
        return
    plt = pyplot()
    fig, axes = plt.subplots(len(kept), 3, figsize=(9, 2.6 * len(kept)), squeeze=False)
    for r, (i, pred) in enumerate(kept):
        img, lab = ds.raw(i)
        panels = [img.permute(1, 2, 0).numpy(), colourise(lab, colours), colourise(pred, colours)]
        for c, (im, title) in enumerate(zip(panels, ("image", "ground truth", "prediction"))):
            axes[r, c].imshow(im.squeeze())
            axes[r, c].set_axis_off()
            if r == 0:
                axes[r, c].set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ----------------------------------------------------------------------------- command
@owns_run_dir
def segment(cfg: SegmentConfig) -> dict:
    """Fine-tune a segmentation model (``segment.pretrained`` backbone, random init without
    one) and score it on ``data.val_split``; writes ``results.json`` (mIoU, per-class IoU,
    pixel accuracy), ``confusion.csv`` (rows ground truth, columns prediction),
    ``predictions.png`` and, with ``segment.save_predictions``, coloured
    PNGs. ``cfg.model`` must be the source's architecture (resolve the config with
    :func:`mimlab.tasks.resolve_run_config`); it runs at ``segment.crop_size``."""
    sg = cfg.segment
    if cfg.optim.layer_decay is None:  # 0.75 for a pretrained backbone, none from scratch
        cfg.optim.layer_decay = 0.75 if sg.pretrained else 1.0
    cfg.model.img_size = sg.crop_size
    if sg.crop_size % cfg.model.patch_size:
        raise ConfigError(
            f"segment.crop_size {sg.crop_size} is not divisible by model.patch_size "
            f"{cfg.model.patch_size}"
        )
    ck = load_pretrained(cfg)  # position embeddings resampled to the crop size
    if ck is not None and cfg.data.mean is None and ck.mean is not None:
        cfg.data.mean, cfg.data.std = list(ck.mean), list(ck.std)  # the source's normalisation
    mean, std = resolve_stats(cfg.data, None, cfg.model.in_chans)
    train, val = seg_splits(
        cfg.data, sg, cfg.model.in_chans, cfg.run.seed, mean, std, progress=cfg.run.progress
    )
    spe, epochs = steps_for(sg.iters, len(train), cfg.optim.batch_size * cfg.optim.accum_steps)
    cfg.optim.epochs = epochs
    run_dir, device = prepare_run(cfg, "segment")
    enc = build_encoder(cfg.model, mask_token=False)
    if ck is not None:
        load_encoder_weights(enc, ck)
        log.info("segmentation from %s", ck.description)
    else:
        log.info("segmentation from a random initialisation")
    nc = train.src.num_classes
    model = Segmenter(enc, nc, sg.head, sg.blocks, sg.channels, sg.aux_weight)
    log.info(
        "%s: %d training pairs, %d test pairs, %d classes, %d steps (%d epochs of %d)",
        train.src.name,
        len(train),
        len(val),
        nc,
        sg.iters,
        epochs,
        spe,
    )
    eng = Engine(
        model,
        train,
        cfg,
        cfg.optim,
        cfg.run,
        run_dir,
        device=device,
        total_steps=sg.iters,
        lr_fn=partial(_lr, warmup=sg.warmup_iters, power=sg.poly_power),
    )
    res = eng.fit()
    colours = palette(nc, train.src.colours)
    pred_dir = run_dir / "predictions"
    on_pred = None
    if sg.save_predictions:
        pred_dir.mkdir(exist_ok=True)

        def on_pred(i: int, pred: torch.Tensor) -> None:
            name = val.src.images[val.indices[i]].stem + ".png"
            Image.fromarray(colourise(pred, colours)).save(pred_dir / name)

    t0 = time.time()
    ev = evaluate(
        model,
        val,
        device,
        sg.test_mode,
        sg.crop_size,
        sg.stride,
        sg.eval_batch,
        keep=np.linspace(0, len(val) - 1, min(sg.figure_images, len(val))).round().astype(int),
        on_pred=on_pred,
        amp_dtype=autocast_dtype(cfg.run.precision, device),
    )
    eval_s = time.time() - t0
    write_figure(run_dir / "predictions.png", val, ev["kept"], colours)
    names = train.classes or [str(k) for k in range(nc)]
    out = {
        "command": "segment",
        "run_dir": str(run_dir),
        "pretrained": sg.pretrained,
        "dataset": train.src.name.split("/")[0],
        "head": sg.head,
        "miou": round(ev["miou"], 3),
        "pixel_acc": round(ev["pixel_acc"], 3),
        "iou": {n: (None if v is None else round(v, 3)) for n, v in zip(names, ev["iou"])},
        "test_mode": sg.test_mode,
        "train_images": len(train),
        "val_images": len(val),
        "val_split": cfg.data.val_split,
        "steps": res.global_step,
        "crop_size": sg.crop_size,
        "batch_size": cfg.optim.batch_size,
        "seconds": round(res.seconds, 1),
        "eval_seconds": round(eval_s, 1),
        "final_loss": res.last_metrics.get("loss"),
        "layer_decay": cfg.optim.layer_decay,
    }
    write_results(run_dir, out)
    np.savetxt(run_dir / "confusion.csv", ev["confusion"].numpy(), fmt="%d", delimiter=",")
    return out


def _lr(step: int, total: int, peak: float, min_lr: float, warmup: int, power: float) -> float:
    return poly_lr(step, total, min(warmup, total), peak, min_lr, power)
