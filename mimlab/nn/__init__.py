"""Layer 1, network parts: pure tensor functions with their shapes and equations (patchify and
masking, losses, batch augmentations, the k-NN vote, linear heads on cached features), the ViT
encoder/decoder and the frozen teachers of MaskDistill-style targets."""

from ..core.deps import import_timm

import_timm()  # before any timm import below: timm must not import wandb
