"""The two transformations T1 / T2 of the siamese methods plus Table 5's augmentations
(Kong & Zhang 2022, Eq. 6 and Sec. 3.2 / Tab. 5).

:class:`ViewMaker` builds, from one batch of dataset-normalised images [B, C, H, W], two views
``x1`` (online, T1) and ``x2`` (target, T2) with their patch masks [B, N] (float, 1 = removed;
``None`` = the view removes nothing). Order of the operations:

1. masks: T1 = ``method.mask`` (random | block | none); T2 = ``method.view2``: the complement
   of T1 (Eq. 6), an independent 25 % mask (R-MAE-dagger), none (identity, R-MAE-double-dagger,
   or a ``crop`` view). **Without patch masking** (``mask=none``, Table 5's "removing patch
   masking") *neither* view is masked, whatever ``view2`` says (the complement of "nothing
   removed" would be an empty view).
2. cutmix (``method.cutmix``): with patch masking one cutmix image is shared by both views
   (the views are complementary patch sets of the same -- augmented -- image, as Eq. 6 derives
   both from one image); **without patch masking each view gets its own cutmix** (its own
   random partner and its own box), otherwise cutmix alone would leave ``x1 == x2``.
3. colour jitter ``whole``: one jitter of the (cutmix) image shared by both views (only with
   patch masking: without it the views would stay identical).
4. crops (``view2=crop``, MoCo v3): two independent random resized crops.
5. colour jitter ``after_mask`` (C-MAE: "we introduce additional color augmentation after the
   transformation ... The detailed color jittering follows SimSiam"): each view its own
   parameters; ``unmasked``: the online view T1 only.

**No leak through the jitter.** Every jitter here is applied to a whole view tensor, so the one
image statistic it uses (contrast's mean grey level, :func:`mimlab.nn.augment.adjust_contrast`)
is taken over the *visible* patches of that view only (for ``whole``: T1's visible patches):
the pixels T1 shows never depend on the pixels T1 hides (tested). Augmentations run only in
training mode (``train=True``).

**Where the randomness lives.** Every draw takes the ``generator`` it is given (the device's
default generator when None). The methods call the view maker from their
``sample_inputs`` (the training engine's batch step, outside ``forward``) and pass the views to
``forward`` as tensors, so a method's forward is a pure function of its inputs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from ..core.registry import JITTERS, MASKS, VIEW2  # noqa: F401  (the choices, declared once)
from ..nn.augment import (
    SIMSIAM_JITTER,
    JitterSpec,
    color_jitter_batch,
    cutmix_batch,
    random_partner,
    random_resized_crop_batch,
)
from ..nn.ops import sample_mask, visible_count


@dataclass
class Views:
    """The two transformed inputs: images [B, C, H, W] and patch masks [B, N] (float,
    1 = removed; ``None`` = the view removes nothing)."""

    x1: Tensor
    x2: Tensor
    mask1: Optional[Tensor]
    mask2: Optional[Tensor]


class ViewMaker:
    """T1 / T2 of the siamese form plus the Table-5 augmentations (see the module docstring)."""

    def __init__(
        self,
        grid: tuple[int, int],
        masking: str = "random",
        mask_ratio: float = 0.75,
        view2: str = "complement",
        view2_mask_ratio: float = 0.25,
        color_jitter: str = "none",
        cutmix: bool = False,
        jitter: JitterSpec = SIMSIAM_JITTER,
        jitter2: Optional[JitterSpec] = None,
        crop_scale: tuple[float, float] = (0.08, 1.0),
        second: str = "view",
    ):
        self.grid, self.num_patches = grid, grid[0] * grid[1]
        self.masking, self.mask_ratio = masking, mask_ratio
        self.view2, self.view2_mask_ratio = view2, view2_mask_ratio
        self.color_jitter, self.cutmix = color_jitter, cutmix
        self.jitter, self.jitter2 = jitter, jitter2 or jitter
        self.crop_scale = crop_scale
        if second not in ("view", "target"):
            raise ValueError(f"second must be 'view' or 'target', got '{second}'")
        self.second = second
        N = self.num_patches
        #: patches each view keeps (Python ints, known before any mask is drawn; N when the
        #: view removes nothing): dropping tokens needs no read of the mask on the host
        self.keep1 = visible_count(masking, N, mask_ratio)
        self.keep2 = N
        if masking != "none" and view2 == "complement":
            self.keep2 = N - self.keep1
        elif masking != "none" and view2 == "independent":
            self.keep2 = visible_count("random", N, view2_mask_ratio)

    def sample_mask(
        self,
        B: int,
        device,
        kind: str,
        ratio: float,
        noise: Optional[Tensor] = None,
        generator: Optional[torch.Generator] = None,
    ) -> Optional[Tensor]:
        """[B, N] float mask (1 = removed) of ``kind`` random | block, or None for none."""
        return sample_mask(kind, B, self.grid, ratio, device, noise, generator)

    def masks(
        self,
        B: int,
        device,
        mask1: Optional[Tensor] = None,
        mask2: Optional[Tensor] = None,
        noise: Optional[Tensor] = None,
        generator: Optional[torch.Generator] = None,
    ) -> tuple[Optional[Tensor], Optional[Tensor]]:
        """(mask1, mask2): given ones are kept; T2's follows ``view2`` (step 1 above)."""
        g = generator
        if mask1 is None:
            mask1 = self.sample_mask(B, device, self.masking, self.mask_ratio, noise, g)
        if mask2 is None and mask1 is not None:
            if self.view2 == "complement":
                mask2 = 1.0 - mask1
            elif self.view2 == "independent":
                mask2 = self.sample_mask(B, device, "random", self.view2_mask_ratio, None, g)
        return mask1, mask2

    def __call__(
        self,
        images: Tensor,
        mean=None,
        std=None,
        train: bool = True,
        mask1: Optional[Tensor] = None,
        mask2: Optional[Tensor] = None,
        noise: Optional[Tensor] = None,
        generator: Optional[torch.Generator] = None,
    ) -> Views:
        B, dev = images.shape[0], images.device
        mask1, mask2 = self.masks(B, dev, mask1, mask2, noise, generator)
        if not train:
            return Views(images, images, mask1, mask2)
        return self.augment(images, mean, std, mask1, mask2, generator)

    def augment(
        self,
        images: Tensor,
        mean=None,
        std=None,
        mask1: Optional[Tensor] = None,
        mask2: Optional[Tensor] = None,
        generator: Optional[torch.Generator] = None,
    ) -> Views:
        """Steps 2-5 on given masks (their visible patches feed the jitter's statistic). With
        ``second='target'`` (masked prediction) ``x2`` is the reconstruction target: the
        (cutmix) image the input was made from with patch masking, the **original** image
        without it; only ``whole`` jitters it."""
        B, dev = images.shape[0], images.device
        g = generator
        masked = self.masking != "none"
        target = self.second == "target"
        vis1 = None if mask1 is None else 1.0 - mask1  # [B, N], 1 = visible
        vis2 = None if mask2 is None else 1.0 - mask2
        x1 = x2 = images
        if self.cutmix:
            if masked:
                x1 = x2 = cutmix_batch(images, generator=g)
            elif target:  # reconstruct the original image from its cutmix
                x1 = cutmix_batch(images, generator=g)
            else:  # two independently augmented views: own partner, own box
                x1 = cutmix_batch(images, partner=random_partner(B, dev, g), generator=g)
                x2 = cutmix_batch(images, partner=random_partner(B, dev, g), generator=g)
        if self.color_jitter == "whole":
            if x1 is not x2:
                raise ValueError(
                    "color_jitter='whole' shares one jitter between identical "
                    "views; without patch masking use 'after_mask'"
                )
            x1 = x2 = color_jitter_batch(x1, mean, std, self.jitter, visible=vis1, generator=g)
        if self.view2 == "crop":
            x1 = random_resized_crop_batch(x1, self.crop_scale, generator=g)
            x2 = random_resized_crop_batch(x2, self.crop_scale, generator=g)
        if self.color_jitter == "after_mask":
            x1 = color_jitter_batch(x1, mean, std, self.jitter, visible=vis1, generator=g)
            if not target:
                x2 = color_jitter_batch(x2, mean, std, self.jitter2, visible=vis2, generator=g)
        elif self.color_jitter == "unmasked":
            x1 = color_jitter_batch(x1, mean, std, self.jitter, visible=vis1, generator=g)
        return Views(x1, x2, mask1, mask2)
