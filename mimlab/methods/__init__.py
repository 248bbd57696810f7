"""Method presets: each is a short declaration composing reusable parts.

``build_method(cfg)`` maps ``cfg.method.name`` to a constructor. Add a method by registering a
function ``(cfg: PretrainConfig) -> Method`` in :data:`METHODS`.
"""
from __future__ import annotations

import difflib
from typing import Callable

from ..config import ConfigError, PretrainConfig
from ..models import build_decoder, build_encoder
from .base import Method
from .masked import MaskedPrediction, PixelTarget


def mae(cfg: PretrainConfig) -> Method:
    """MAE (He et al.; Eq. 2-3 of Kong & Zhang): random masking, drop masked tokens,
    transformer decoder, L2 on removed patches of (optionally per-patch normalised) pixels."""
    m = cfg.model
    return MaskedPrediction(
        encoder=build_encoder(m, mask_token=False, drop_path=0.0),
        head=build_decoder(m),
        target=PixelTarget(m.patch_size),
        mask_ratio=cfg.method.mask_ratio, masking="random", student="drop",
        target_norm="patch" if cfg.method.norm_pix_loss else "none", loss="l2")


METHODS: dict[str, Callable[[PretrainConfig], Method]] = {"mae": mae}


def build_method(cfg: PretrainConfig) -> Method:
    name = cfg.method.name
    if name not in METHODS:
        close = difflib.get_close_matches(name, list(METHODS), n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise ConfigError(f"method.name: unknown method '{name}'{hint}; available: "
                          f"{', '.join(METHODS)}")
    return METHODS[name](cfg)


__all__ = ["Method", "MaskedPrediction", "PixelTarget", "METHODS", "build_method", "mae"]
