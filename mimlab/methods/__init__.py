"""Methods: each is a short declaration composing reusable parts (the unified view).

``build_method(cfg)`` reads ``cfg.method`` (a preset from ``config.METHOD_PRESETS`` filled in,
plus the user's explicit fields) and composes:

* masked prediction (:class:`MaskedPrediction`: MAE, SimMIM, MaskFeat, MaskDistill, ...):
  masking + target + normalisation + student mode + head + regression loss;
* siamese methods (R-MAE, C-MAE, MoCo v3): two transformations T1/T2 of the same image, an
  encoder (online / EMA target) and a similarity measurement (see ``siamese.py``).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch.nn as nn

from ..config import ConfigError, PretrainConfig
from ..models import build_decoder, build_encoder
from .base import Method
from .masked import MaskedPrediction, PixelTarget
from .targets import build_target

REGRESSION_LOSSES = ("l2", "l1", "smooth_l1", "cosine")


def build_head(cfg: PretrainConfig, out_dim: int) -> nn.Module:
    """decoder: MAE transformer decoder; linear: one linear layer per token."""
    m = cfg.method
    if m.head == "decoder":
        return build_decoder(cfg.model, out_dim)
    if m.head == "linear":
        return nn.Linear(cfg.model.embed_dim, out_dim)
    raise ConfigError(f"method.head: '{m.head}' is not a masked-prediction head "
                      "(decoder | linear)")


def build_masked_prediction(cfg: PretrainConfig, data_mean: Optional[Sequence[float]] = None,
                            data_std: Optional[Sequence[float]] = None) -> MaskedPrediction:
    """``data_mean``/``data_std``: the training images' normalisation, for teacher targets."""
    m = cfg.method
    if m.loss not in REGRESSION_LOSSES:
        raise ConfigError(f"method.loss: masked prediction regresses its target; use one of "
                          f"{', '.join(REGRESSION_LOSSES)} (got '{m.loss}')")
    if m.student == "drop" and m.head == "linear":
        raise ConfigError("method.head=linear needs method.student=mask_token (a linear head "
                          "predicts from the masked positions' own tokens)")
    # method.mask=none (Table 5): reconstruct the original image from its augmented version;
    # siamese.check_method refuses it when nothing is augmented (a trivial objective)
    encoder = build_encoder(cfg.model, mask_token=m.student == "mask_token", drop_path=0.0)
    target = build_target(cfg, encoder, data_mean, data_std)
    # teacher / EMA targets set the head's output width (pixels: p * p * C)
    out_dim = getattr(target, "out_dim", cfg.model.patch_size ** 2 * cfg.model.in_chans)
    return MaskedPrediction(encoder=encoder, head=build_head(cfg, out_dim), target=target,
                            mask_ratio=m.mask_ratio, masking=m.mask, student=m.student,
                            target_norm=m.target_norm, loss=m.loss, loss_beta=m.loss_beta,
                            color_jitter=m.color_jitter, cutmix=m.cutmix)


def is_siamese(cfg: PretrainConfig) -> bool:
    m = cfg.method
    return m.view2 != "none" or m.loss in ("infonce", "byol") or m.target == "online"


def build_method(cfg: PretrainConfig, data_mean: Optional[Sequence[float]] = None,
                 data_std: Optional[Sequence[float]] = None) -> Method:
    """Compose the method described by ``cfg.method`` (invalid combinations: ConfigError).

    ``data_mean``/``data_std``: per-channel statistics the training images are normalised with
    (``tasks.pretrain`` passes the dataset's); frozen teachers undo them. Default:
    ``data.mean``/``std`` of the config, else ImageNet's (0.5 for non-RGB)."""
    if is_siamese(cfg):
        try:
            from .siamese import build_siamese
        except ImportError as e:  # pragma: no cover - until siamese methods exist
            raise ConfigError(f"siamese methods are not available: {e}") from None
        return build_siamese(cfg)
    return build_masked_prediction(cfg, data_mean, data_std)


__all__ = ["Method", "MaskedPrediction", "PixelTarget", "build_method", "build_head",
           "build_masked_prediction", "build_target", "is_siamese"]
