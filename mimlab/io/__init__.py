"""Layer 3, weights and files in and out: the checkpoint schema, model sources (mimlab, official
MAE, timm, HF, MoCo v3), export to the Hub formats, metric sinks and shared plot helpers."""

from ..core.deps import import_timm

import_timm()  # before any timm import below: timm must not import wandb
