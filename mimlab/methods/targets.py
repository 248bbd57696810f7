"""Targets of masked prediction (the 'teacher' of the unified view): [B, C, H, W] -> [B, N, C_t].

``build_target(cfg, encoder)`` maps ``method.target`` to a module; every target runs without
gradients. Pixel targets are the patches themselves.
"""
from __future__ import annotations

import torch.nn as nn

from ..config import ConfigError, PretrainConfig
from .masked import PixelTarget


def build_target(cfg: PretrainConfig, encoder: nn.Module) -> nn.Module:
    m = cfg.method
    if m.target == "pixels":
        return PixelTarget(cfg.model.patch_size)
    raise ConfigError(f"method.target: '{m.target}' is not available for masked prediction "
                      "(pixels)")
