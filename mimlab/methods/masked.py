"""Masked prediction, the unified view of MIM (MaskDistill paper): every method is

    masking  +  target (pixels / teacher features)  +  target normalisation
             +  student mode (drop masked tokens | learnable mask token)  +  head  +  loss

:class:`MaskedPrediction` is that composition; MAE is one short declaration of it (the
``mae`` preset of :mod:`mimlab.core.registry`): random masking 75 %, pixel target, per-patch
normalisation (``norm_pix``), masked tokens dropped, transformer decoder head, L2 on the
removed patches (Eq. 2-3 of Kong & Zhang).
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
import torch.nn as nn

from ..nn.losses import instance_norm_tokens, layernorm_target, patch_norm_target, regression_loss
from ..nn.models import ViTEncoder
from ..nn.ops import patchify, random_masking, sample_mask
from .base import Method, encode
from .views import ViewMaker

TargetFn = Callable[[torch.Tensor], torch.Tensor]  # images [B,C,H,W] -> [B, N, C_t]


def normalize_target(t: torch.Tensor, kind: str) -> torch.Tensor:
    """[B, N, C] -> [B, N, C]. 'patch': per-token standardisation (MAE norm_pix, unbiased
    variance); 'layernorm': LayerNorm without affine over C (MaskDistill); 'instance': each
    channel standardised over the N tokens of its image (data2vec); 'none': unchanged."""
    if kind == "patch":
        return patch_norm_target(t)
    if kind == "layernorm":
        return layernorm_target(t)
    if kind == "instance":
        return instance_norm_tokens(t)
    if kind == "none":
        return t
    raise ValueError(f"unknown target normalisation '{kind}' (patch | layernorm | instance | none)")


class PixelTarget(nn.Module):
    """Raw pixels of every patch: [B, C, H, W] -> [B, N, p*p*C] (in normalised-image units)."""

    def __init__(self, patch_size: int):
        super().__init__()
        self.patch_size = patch_size

    def forward(self, imgs: torch.Tensor) -> torch.Tensor:
        return patchify(imgs, self.patch_size)


class MaskedPrediction(Method):
    """Generic masked-prediction objective (see module docstring).

    ``forward(images, labels=None, noise=None, mask=None)``: pass ``noise`` [B, N] to reproduce
    a random masking exactly, or an explicit ``mask`` [B, N] (1 = removed). ``masking='none'``
    (Table 5 without patch masking): every patch is encoded and predicted from the augmented
    image and the loss counts every patch against the original image (``mask`` returned as all
    ones).
    Returns ``loss`` plus ``pred`` [B, N, C_t], ``target`` [B, N, C_t] (normalised) and ``mask``.
    """

    def __init__(
        self,
        encoder: ViTEncoder,
        head: nn.Module,
        target: nn.Module,
        mask_ratio: float = 0.75,
        masking: str = "random",
        student: str = "drop",
        target_norm: str = "patch",
        loss: str = "l2",
        loss_beta: float = 2.0,
        color_jitter: str = "none",
        cutmix: bool = False,
        data_mean: Optional[Sequence[float]] = None,
        data_std: Optional[Sequence[float]] = None,
    ):
        super().__init__()
        self.set_data_stats(data_mean, data_std)
        if student not in ("drop", "mask_token"):
            raise ValueError(f"student mode must be drop | mask_token, got '{student}'")
        if student == "mask_token" and encoder.mask_token is None:
            raise ValueError("student mode 'mask_token' needs an encoder with a mask token")
        self.encoder, self.head, self.target = encoder, head, target
        self.mask_ratio, self.masking, self.student = mask_ratio, masking, student
        self.target_norm, self.loss_kind, self.loss_beta = target_norm, loss, loss_beta
        self.color_jitter, self.cutmix = color_jitter, cutmix
        # Table 5's augmentations: the same steps as the siamese views, x2 = the target
        self.views = ViewMaker(
            encoder.grid,
            masking,
            mask_ratio,
            "none",
            color_jitter=color_jitter,
            cutmix=cutmix,
            second="target",
        )

    def augment(
        self, images: torch.Tensor, visible: Optional[torch.Tensor] = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Table 5 / 4 of Kong & Zhang, in training only -> (input, target images).

        With patch masking: ``cutmix`` mixes both (MAE reconstructs the masked patches of the
        cutmix image); colour jitter ``whole`` changes both ("augmenting the whole image before
        applying MAE"), ``unmasked`` (and ``after_mask``, the same for one view) only the input
        ("only augmenting the unmasked patches (i.e. the reconstruction targets keep the
        same)"). Contrast's mean grey level comes from the ``visible`` patches [B, N] (1 =
        visible) only, so no masked content reaches the visible input pixels.

        Without patch masking (``mask=none``, Table 5's "removing patch masking") the target is
        always the **original** image: MAE reconstructs the image from its augmented (cutmix
        and / or jittered) version. See :mod:`mimlab.nn.augment`."""
        if not self.training or (self.color_jitter == "none" and not self.cutmix):
            return images, images
        v = self.views.augment(
            images, *self.data_stats(images.shape[1]), None if visible is None else 1.0 - visible
        )
        return v.x1, v.x2

    def make_mask(self, B: int, device, noise: Optional[torch.Tensor] = None) -> torch.Tensor:
        return sample_mask(self.masking, B, self.encoder.grid, self.mask_ratio, device, noise)

    def forward(
        self,
        images: torch.Tensor,
        labels: Optional[torch.Tensor] = None,
        noise: Optional[torch.Tensor] = None,
        mask: Optional[torch.Tensor] = None,
    ):
        B = images.shape[0]
        ids_keep = ids_restore = None
        if mask is None and self.masking != "none":
            if self.student == "drop" and self.masking == "random":
                if noise is None:
                    noise = torch.rand(B, self.encoder.num_patches, device=images.device)
                ids_keep, mask, ids_restore = random_masking(noise, self.mask_ratio)
            else:
                mask = self.make_mask(B, images.device, noise)
        images, target_images = self.augment(images, None if mask is None else 1.0 - mask)
        # no patch masking (mask None): every patch is encoded and predicted
        e = encode(
            self.encoder,
            images,
            mask,
            self.student,
            None if ids_keep is None else (ids_keep, ids_restore),
        )
        if self.student == "drop":  # the MAE decoder restores the dropped positions
            pred = self.head(e.tokens, e.ids_restore)
        else:  # a head on the grid of patch tokens
            pred = self.head(e.tokens[:, 1:, :])
        with torch.no_grad():
            target = normalize_target(self.target(target_images).float(), self.target_norm)
        loss = regression_loss(pred, target, mask, self.loss_kind, self.loss_beta)
        if mask is None:  # the loss counted every patch
            mask = torch.ones(pred.shape[:2], device=pred.device)
        return {"loss": loss, "pred": pred, "target": target, "mask": mask}

    @torch.no_grad()
    def after_step(self, step: int, total_steps: int) -> None:
        """Targets that follow the student (data2vec's EMA encoder,
        :class:`~mimlab.methods.targets.EMATarget`) define ``update(online_encoder)``; it is
        called here after every optimizer step. Frozen and pixel targets have no ``update``."""
        update = getattr(self.target, "update", None)
        if update is not None:
            update(self.encoder)
