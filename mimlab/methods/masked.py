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
from ..nn.ops import mask_to_ids, patchify, random_masking, sample_mask
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

    ``forward(images, labels=None, noise=None, mask=None, target_images=None, ids_keep=None,
    ids_restore=None)``: the engine passes what :meth:`sample_inputs` drew (then forward draws
    nothing); called directly, pass ``noise`` [B, N] to reproduce a random masking exactly, or
    an explicit ``mask`` [B, N] (1 = removed), and forward draws the rest. ``masking='none'``
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

    def augments(self) -> bool:
        """Whether a training step augments the images (Table 5's cutmix / colour jitter)."""
        return self.training and (self.color_jitter != "none" or self.cutmix)

    def augment(
        self,
        images: torch.Tensor,
        visible: Optional[torch.Tensor] = None,
        generator: Optional[torch.Generator] = None,
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
        if not self.augments():
            return images, images
        v = self.views.augment(
            images,
            *self.data_stats(images.shape[1]),
            None if visible is None else 1.0 - visible,
            generator=generator,
        )
        return v.x1, v.x2

    def make_mask(
        self,
        B: int,
        device,
        noise: Optional[torch.Tensor] = None,
        generator: Optional[torch.Generator] = None,
    ) -> torch.Tensor:
        return sample_mask(
            self.masking, B, self.encoder.grid, self.mask_ratio, device, noise, generator
        )

    @torch.no_grad()
    def sample_inputs(
        self,
        images: torch.Tensor,
        generator: Optional[torch.Generator] = None,
        noise: Optional[torch.Tensor] = None,
        mask: Optional[torch.Tensor] = None,
    ) -> dict:
        """The mask (drawn unless ``noise`` / ``mask`` is given), then the augmentation, in
        this order (the order of the draws before they left ``forward``: a seed gives the same
        masks and the same losses). Returns ``images`` (augmented in training with Table 5's
        switches), ``mask`` [B, N] (absent without patch masking), ``ids_keep`` [B, K] and
        ``ids_restore`` [B, N] when masked tokens are dropped, ``target_images`` when
        augmented."""
        B, dev = images.shape[0], images.device
        out: dict = {}
        ids_keep = ids_restore = None
        if mask is None and self.masking != "none":
            if self.student == "drop" and self.masking == "random":
                if noise is None:
                    noise = torch.rand(B, self.encoder.num_patches, device=dev, generator=generator)
                ids_keep, mask, ids_restore = random_masking(noise, self.mask_ratio)
            else:
                mask = self.make_mask(B, dev, noise, generator)
        if mask is not None:
            out["mask"] = mask
            if self.student == "drop":
                if ids_keep is None:  # a given mask: its count is read once, here
                    ids_keep, ids_restore = mask_to_ids(mask)
                out.update(ids_keep=ids_keep, ids_restore=ids_restore)
        if self.augments():
            x, t = self.augment(images, None if mask is None else 1.0 - mask, generator)
            out.update(images=x, target_images=t)
        else:
            out["images"] = images
        return out

    def forward(
        self,
        images: torch.Tensor,
        labels: Optional[torch.Tensor] = None,
        noise: Optional[torch.Tensor] = None,
        mask: Optional[torch.Tensor] = None,
        target_images: Optional[torch.Tensor] = None,
        ids_keep: Optional[torch.Tensor] = None,
        ids_restore: Optional[torch.Tensor] = None,
    ):
        drawn = (
            self.masking == "none"
            or (mask is not None and (self.student != "drop" or ids_keep is not None))
        ) and (target_images is not None or not self.augments())
        if not drawn:  # called directly: draw what the engine's batch step would have
            kw = self.sample_inputs(images, None, noise, mask)
            images, mask, target_images = kw["images"], kw.get("mask"), kw.get("target_images")
            ids_keep, ids_restore = kw.get("ids_keep"), kw.get("ids_restore")
        if target_images is None:
            target_images = images
        # no patch masking (mask None): every patch is encoded and predicted
        e = encode(
            self.encoder,
            images,
            mask,
            self.student,
            None if ids_keep is None or ids_restore is None else (ids_keep, ids_restore),
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
