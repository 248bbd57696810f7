"""What every method gives the shared training engine.

A method is an ``nn.Module`` whose ``forward(images, labels)`` returns a dict with a scalar
``loss`` (and optional scalar metrics); it exposes the ``encoder`` that evaluation and export
use, the parameter names exempt from weight decay, and an ``after_step`` hook (EMA updates).
"""
from __future__ import annotations

import torch
import torch.nn as nn


class Method(nn.Module):
    #: methods with parameters unused in some steps set this for DistributedDataParallel
    ddp_find_unused: bool = False

    encoder: nn.Module

    def no_weight_decay(self) -> set[str]:
        """Full parameter names (as in ``named_parameters``) without weight decay, on top of
        every 1-D parameter (norms, biases) which the engine always exempts."""
        out = set()
        for prefix, mod in self.named_modules():
            if hasattr(mod, "no_weight_decay") and mod is not self:
                out |= {f"{prefix}.{n}" if prefix else n for n in mod.no_weight_decay()}
        return out

    @torch.no_grad()
    def after_step(self, step: int, total_steps: int) -> None:
        """Called after every optimizer step (EMA target updates go here)."""

    def extra_state(self) -> dict:
        return {}
