"""Methods: each is a short declaration composing reusable parts (the unified view).

``build_method(cfg)`` reads ``cfg.method`` (a preset of :data:`mimlab.core.registry.PRESETS` filled
in, plus the user's explicit fields), finds its family (:func:`mimlab.core.registry.family_of`) and
calls that family's builder in :data:`BUILDERS`:

* ``masked`` (:class:`MaskedPrediction`: MAE, SimMIM, MaskFeat, MaskDistill, data2vec):
  masking + target + normalisation + student mode + head + regression loss;
* ``relaxed`` (R-MAE) and ``contrastive`` (C-MAE, MoCo v3): two transformations T1/T2 of the
  same image, an encoder (online / EMA target) and a similarity measurement
  (:mod:`mimlab.methods.siamese`).
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch.nn as nn

from ..core.config import PretrainConfig
from ..core.registry import FAMILIES, check_method, family_of
from ..data.datasets import resolve_stats
from ..nn.models import build_decoder, build_encoder
from .base import Method
from .masked import MaskedPrediction, PixelTarget
from .siamese import build_siamese
from .targets import build_target


def build_head(cfg: PretrainConfig, out_dim: int) -> nn.Module:
    """decoder: MAE transformer decoder; linear: one linear layer per token."""
    if cfg.method.head == "decoder":
        return build_decoder(cfg.model, out_dim)
    return nn.Linear(cfg.model.embed_dim, out_dim)


def build_masked_prediction(
    cfg: PretrainConfig,
    data_mean: Optional[Sequence[float]] = None,
    data_std: Optional[Sequence[float]] = None,
) -> MaskedPrediction:
    """``data_mean``/``data_std``: the training images' normalisation, for teacher targets.
    method.mask=none (Table 5): reconstruct the original image from its augmented version
    (:func:`mimlab.core.registry.check_method` refuses it when nothing is augmented)."""
    m = cfg.method
    check_method(m)
    encoder = build_encoder(cfg.model, mask_token=m.student == "mask_token", drop_path=0.0)
    target = build_target(cfg, encoder, data_mean, data_std)
    # teacher / EMA targets set the head's output width (pixels: p * p * C)
    out_dim = getattr(target, "out_dim", cfg.model.patch_size**2 * cfg.model.in_chans)
    return MaskedPrediction(
        encoder=encoder,
        head=build_head(cfg, out_dim),
        target=target,
        mask_ratio=m.mask_ratio,
        masking=m.mask,
        student=m.student,
        target_norm=m.target_norm,
        loss=m.loss,
        loss_beta=m.loss_beta,
        color_jitter=m.color_jitter,
        cutmix=m.cutmix,
        data_mean=data_mean,
        data_std=data_std,
    )


#: family name (mimlab.core.registry.FAMILIES) -> builder(cfg, data_mean, data_std)
BUILDERS: dict[str, Callable[..., Method]] = {
    "masked": build_masked_prediction,
    "relaxed": build_siamese,
    "contrastive": build_siamese,
}
assert set(BUILDERS) == set(FAMILIES), "every method family needs a builder"


def is_siamese(cfg: PretrainConfig) -> bool:
    """Two views (R-MAE, C-MAE, MoCo v3) rather than masked prediction."""
    return family_of(cfg.method).name != "masked"


def build_method(
    cfg: PretrainConfig,
    data_mean: Optional[Sequence[float]] = None,
    data_std: Optional[Sequence[float]] = None,
) -> Method:
    """Compose the method described by ``cfg.method`` (invalid combinations: ConfigError).

    ``data_mean``/``data_std``: per-channel statistics the training images are normalised with
    (``train.pretraining.pretrain`` passes the dataset's); frozen teachers undo them. Default:
    ``data.mean``/``std`` of the config, else :func:`mimlab.data.datasets.default_stats`. The
    method keeps them (``method.data_stats``) for the augmentations that work on pixels."""
    if data_mean is None or data_std is None:
        data_mean, data_std = resolve_stats(cfg.data, None, cfg.model.in_chans)
    return BUILDERS[family_of(cfg.method).name](cfg, data_mean, data_std)


__all__ = [
    "BUILDERS",
    "Method",
    "MaskedPrediction",
    "PixelTarget",
    "build_method",
    "build_head",
    "build_masked_prediction",
    "build_target",
    "is_siamese",
]
