"""Semantic-segmentation parts for a plain ViT: feature extraction at any input size, the
multi-scale neck, a linear head, UperNet with an optional auxiliary FCN head, and the
confusion-matrix metrics (mIoU, per-class IoU, pixel accuracy).

Shapes: images [B, C, H, W]; patch-token maps [B, D, H/p, W/p]; logits [B, K, H, W];
labels [B, H, W] (long, :data:`IGNORE` = -1 where a pixel is not scored).

The recipes follow BEiT / MAE / MaskDistill on ADE20K (UperNet on blocks 4, 6, 8, 12 of a
12-block ViT turned into 4x, 2x, 1x and 1/2x maps by two transposed convolutions, one, none
and a max-pool) and DINOv2's linear protocol (BatchNorm + 1x1 convolution on the last block's
patch tokens, bilinear upsampling).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import resample_abs_pos_embed

from .models import ViTEncoder, run_block

#: label value of pixels that are not scored (void / ADE20K's 0 / padding)
IGNORE = -1


def default_block_ids(depth: int) -> list[int]:
    """Blocks whose outputs feed UperNet (1-based): 4, 6, 8, 12 of 12; for another depth the
    same fractions (1/3, 1/2, 2/3, 1), e.g. 8, 12, 16, 24 of 24; [1, 1, 2, 2] of 2."""
    return [max(1, round(depth * f)) for f in (1 / 3, 1 / 2, 2 / 3, 1.0)]


def vit_feature_maps(
    enc: ViTEncoder, x: torch.Tensor, block_ids: Sequence[int], final_norm: bool = False
) -> list[torch.Tensor]:
    """Patch-token maps [B, D, H/p, W/p] after each block of ``block_ids`` (1-based) for an
    input of any size divisible by the patch size: the position embeddings (class token
    first) are resampled bicubically to the input's grid when it is not the encoder's.
    ``final_norm`` applies the encoder's final LayerNorm to the last requested block (the
    linear protocol reads normalised tokens)."""
    B, _, H, W = x.shape
    p = enc.patch_size
    if H % p or W % p:
        raise ValueError(f"input {H}x{W} is not divisible by the patch size {p}")
    gh, gw = H // p, W // p
    t = F.conv2d(x, enc.patch_embed.proj.weight, enc.patch_embed.proj.bias, stride=p)
    t = t.flatten(2).transpose(1, 2)  # [B, N, D]
    pos = enc.pos_embed
    if (gh, gw) != tuple(enc.grid):
        pos = resample_abs_pos_embed(pos.float(), [gh, gw], list(enc.grid), num_prefix_tokens=1)
    pos = pos.to(t.dtype)
    cls = (enc.cls_token + pos[:, :1, :]).to(t.dtype).expand(B, -1, -1)
    t = torch.cat([cls, t + pos[:, 1:, :]], dim=1)
    want = sorted(set(block_ids))
    outs: dict[int, torch.Tensor] = {}
    for i, blk in enumerate(enc.blocks[: want[-1]], start=1):
        t = run_block(blk, t, enc.grad_checkpointing)
        if i in want:
            outs[i] = t
    maps = []
    for j, b in enumerate(block_ids):
        o = outs[b]
        if final_norm and j == len(block_ids) - 1:
            o = enc.norm(o)
        maps.append(o[:, 1:, :].transpose(1, 2).reshape(B, -1, gh, gw))
    return maps


class LinearHead(nn.Module):
    """DINOv2's linear protocol: BatchNorm + 1x1 convolution on a [B, D, h, w] token map ->
    logits [B, K, h, w] (upsampling is the caller's)."""

    def __init__(self, dim: int, num_classes: int):
        super().__init__()
        self.bn = nn.BatchNorm2d(dim)
        self.conv = nn.Conv2d(dim, num_classes, 1)
        nn.init.normal_(self.conv.weight, std=0.01)
        nn.init.zeros_(self.conv.bias)

    def forward(self, feats: list[torch.Tensor]) -> torch.Tensor:
        return self.conv(self.bn(feats[-1]))


class MultiScaleNeck(nn.Module):
    """Four equal-resolution ViT maps [B, D, h, w] -> [4h, 2h, h, h/2] (BEiT's fpn1..fpn4):
    two stride-2 transposed convolutions (BatchNorm + GELU between), one, identity, 2x2
    max-pool."""

    def __init__(self, dim: int):
        super().__init__()
        self.fpn1 = nn.Sequential(
            nn.ConvTranspose2d(dim, dim, 2, 2),
            nn.BatchNorm2d(dim),
            nn.GELU(),
            nn.ConvTranspose2d(dim, dim, 2, 2),
        )
        self.fpn2 = nn.ConvTranspose2d(dim, dim, 2, 2)
        self.fpn3 = nn.Identity()
        self.fpn4 = nn.MaxPool2d(2, 2)

    def forward(self, feats: list[torch.Tensor]) -> list[torch.Tensor]:
        if len(feats) != 4:
            raise ValueError(f"MultiScaleNeck needs 4 maps, got {len(feats)}")
        return [f(x) for f, x in zip((self.fpn1, self.fpn2, self.fpn3, self.fpn4), feats)]


def _cbr(cin: int, cout: int, k: int) -> nn.Sequential:
    """Conv (no bias) + BatchNorm + ReLU, 'same' padding."""
    return nn.Sequential(
        nn.Conv2d(cin, cout, k, padding=k // 2, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class UperNetHead(nn.Module):
    """UperNet (Xiao et al., 2018) decode head: a pyramid-pooling module (scales 1, 2, 3, 6) on
    the coarsest map, a top-down FPN with 1x1 laterals and 3x3 outputs, all levels upsampled
    to the finest and fused by a 3x3 convolution, dropout 0.1, 1x1 classifier.

    Input: 4 maps [B, D_i, h_i, w_i], finest first; output logits at the finest resolution."""

    def __init__(
        self,
        in_dims: Sequence[int],
        num_classes: int,
        channels: int = 512,
        pool_scales: Sequence[int] = (1, 2, 3, 6),
        dropout: float = 0.1,
    ):
        super().__init__()
        self.pool_scales = tuple(pool_scales)
        self.ppm = nn.ModuleList(
            [
                nn.Sequential(nn.AdaptiveAvgPool2d(s), _cbr(in_dims[-1], channels, 1))
                for s in self.pool_scales
            ]
        )
        self.bottleneck = _cbr(in_dims[-1] + len(self.pool_scales) * channels, channels, 3)
        self.lateral = nn.ModuleList([_cbr(d, channels, 1) for d in in_dims[:-1]])
        self.fpn_out = nn.ModuleList([_cbr(channels, channels, 3) for _ in in_dims[:-1]])
        self.fuse = _cbr(len(in_dims) * channels, channels, 3)
        self.dropout = nn.Dropout2d(dropout)
        self.cls = nn.Conv2d(channels, num_classes, 1)
        nn.init.normal_(self.cls.weight, std=0.01)
        nn.init.zeros_(self.cls.bias)

    @staticmethod
    def _up(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return F.interpolate(x, size=like.shape[-2:], mode="bilinear", align_corners=False)

    def forward(self, feats: list[torch.Tensor]) -> torch.Tensor:
        top = feats[-1]
        pooled = [top] + [self._up(m(top), top) for m in self.ppm]
        lat = [m(f) for m, f in zip(self.lateral, feats[:-1])] + [
            self.bottleneck(torch.cat(pooled, 1))
        ]
        for i in range(len(lat) - 1, 0, -1):  # top-down pathway
            lat[i - 1] = lat[i - 1] + self._up(lat[i], lat[i - 1])
        outs = [m(x) for m, x in zip(self.fpn_out, lat[:-1])] + [lat[-1]]
        outs = [outs[0]] + [self._up(o, outs[0]) for o in outs[1:]]
        return self.cls(self.dropout(self.fuse(torch.cat(outs, 1))))


class FCNHead(nn.Module):
    """Auxiliary head of the recipe: 3x3 conv + BN + ReLU, dropout 0.1, 1x1 classifier on one
    map [B, D, h, w] -> [B, K, h, w]."""

    def __init__(self, dim: int, num_classes: int, channels: int = 256, dropout: float = 0.1):
        super().__init__()
        self.conv = _cbr(dim, channels, 3)
        self.dropout = nn.Dropout2d(dropout)
        self.cls = nn.Conv2d(channels, num_classes, 1)
        nn.init.normal_(self.cls.weight, std=0.01)
        nn.init.zeros_(self.cls.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.cls(self.dropout(self.conv(x)))


# ----------------------------------------------------------------------------- metrics
def confusion_matrix(
    pred: torch.Tensor, target: torch.Tensor, num_classes: int, ignore: int = IGNORE
) -> torch.Tensor:
    """[K, K] int64 counts, rows = ground truth, columns = prediction, over the pixels whose
    target is not ``ignore`` (pred and target: integer tensors of the same shape)."""
    if pred.shape != target.shape:
        raise ValueError(f"prediction {tuple(pred.shape)} vs target {tuple(target.shape)}")
    keep = target != ignore
    t = target[keep].long()
    p = pred[keep].long()
    idx = t * num_classes + p
    return torch.bincount(idx, minlength=num_classes * num_classes).reshape(
        num_classes, num_classes
    )


def scores_from_confusion(cm: torch.Tensor) -> dict:
    """mIoU, per-class IoU, pixel accuracy (all in %) of a confusion matrix [K, K] (rows =
    ground truth). IoU_k = TP / (TP + FP + FN); classes that appear neither in the ground truth
    nor in the predictions have no IoU (None) and are left out of the mean, as in mmseg."""
    cm = cm.double()
    tp = cm.diag()
    gt = cm.sum(1)
    pr = cm.sum(0)
    union = gt + pr - tp
    iou = [float(100 * tp[k] / union[k]) if union[k] > 0 else None for k in range(len(tp))]
    valid = [v for v in iou if v is not None]
    total = float(cm.sum())
    return {
        "miou": sum(valid) / len(valid) if valid else 0.0,
        "pixel_acc": float(100 * tp.sum() / total) if total > 0 else 0.0,
        "iou": iou,
    }


def poly_lr(step: int, total: int, warmup: int, peak: float, min_lr: float, power: float):
    """Linear warm-up from 0 to ``peak`` over ``warmup`` steps, then the poly schedule
    ``min_lr + (peak - min_lr) * (1 - t) ** power`` with t the fraction of the remaining
    steps done (the segmentation recipes: power 1.0, i.e. linear decay to ``min_lr``)."""
    if warmup > 0 and step < warmup:
        return peak * step / warmup
    if total <= warmup:
        return peak
    t = min(1.0, (step - warmup) / (total - warmup))
    return min_lr + (peak - min_lr) * (1.0 - t) ** power


def palette(num_classes: int, known: Optional[Sequence[Sequence[int]]] = None) -> torch.Tensor:
    """[K + 1, 3] uint8 colours for class ids 0..K-1 and, last, black for ignored pixels:
    ``known`` colours first, then a fixed pseudo-random set."""
    g = torch.Generator().manual_seed(1234)
    cols = torch.randint(40, 256, (num_classes + 1, 3), generator=g, dtype=torch.int64)
    if known:
        for k, c in enumerate(known[:num_classes]):
            cols[k] = torch.tensor(list(c))
    cols[-1] = 0
    return cols.to(torch.uint8)
