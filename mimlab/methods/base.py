"""What every method gives the shared training engine.

A method is an ``nn.Module`` whose ``forward(images, labels, **inputs)`` returns a dict with a
scalar ``loss`` (and optional scalar metrics); it exposes the ``encoder`` that evaluation and
export use, the parameter names exempt from weight decay, and an ``after_step`` hook (EMA
updates).

**Randomness outside forward.** Everything random in a training step (masks, views, colour
jitter, cutmix, crops) is drawn by :meth:`Method.sample_inputs` from the generator the engine
gives it (the device's default generator: seeded by ``run.seed``, saved in every checkpoint),
and handed to ``forward`` as tensors. ``forward`` is then a pure function of its inputs:
the same inputs give the same outputs, and the encoder / decoder trace under
``torch.compile`` without graph breaks (tests/test_compile_ready.py). Called without those
inputs (tests, analysis tools), ``forward`` draws them itself from the default generator,
in the same order.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn as nn
from torch import Tensor

from ..data.datasets import default_stats
from ..nn.models import ViTEncoder
from ..nn.ops import mask_to_ids


class Method(nn.Module):
    #: methods with parameters unused in some steps set this for DistributedDataParallel
    ddp_find_unused: bool = False

    encoder: nn.Module
    #: per-channel statistics the input images are normalised with (set by the constructor;
    #: augmentations that work on pixels undo and redo them)
    data_mean: Optional[list] = None
    data_std: Optional[list] = None

    def set_data_stats(
        self, mean: Optional[Sequence[float]], std: Optional[Sequence[float]]
    ) -> None:
        self.data_mean = None if mean is None else list(mean)
        self.data_std = None if std is None else list(std)

    def data_stats(self, channels: int) -> tuple[list[float], list[float]]:
        """``(mean, std)`` of the inputs; :func:`mimlab.data.datasets.default_stats` when unset."""
        if self.data_mean is None or self.data_std is None or len(self.data_mean) != channels:
            return default_stats(channels)
        return list(self.data_mean), list(self.data_std)

    def sample_inputs(
        self, images: Tensor, generator: Optional[torch.Generator] = None
    ) -> dict[str, Tensor]:
        """The random part of one step, drawn from ``generator`` (the device's default when
        None): the keyword arguments of ``forward``, ``images`` [B, C, H, W] included (possibly
        augmented). The engine calls it under ``torch.no_grad()`` before every forward, as
        ``method(labels=labels, **method.sample_inputs(images, generator))``. Default: nothing
        random."""
        return {"images": images}

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


@torch.no_grad()
def ema_update_(target: nn.Module, online: nn.Module, momentum: float) -> None:
    """The one EMA step of every target network (C-MAE, MoCo v3, data2vec):
    ``theta_t <- momentum * theta_t + (1 - momentum) * theta_o`` for every parameter pair, and
    the online network's buffers copied (same architecture). The copy changes no training loss:
    targets run in training mode, where BatchNorm uses batch statistics, and the ViT's
    position embedding is a fixed buffer; it keeps an exported target consistent."""
    tp, op = list(target.parameters()), list(online.parameters())
    if len(tp) != len(op):
        raise ValueError("EMA target and online networks have different parameters")
    torch._foreach_mul_(tp, momentum)
    torch._foreach_add_(tp, [p.detach() for p in op], alpha=1.0 - momentum)
    for b, ob in zip(target.buffers(), online.buffers()):
        b.copy_(ob)


@dataclass
class Encoded:
    """Encoder output: ``tokens`` [B, 1 + L, D] (class token first); ``ids_keep`` [B, L] the
    grid positions of the L patch tokens when masked tokens were dropped (None: all N tokens in
    grid order); ``ids_restore`` for the MAE decoder."""

    tokens: Tensor
    ids_keep: Optional[Tensor] = None
    ids_restore: Optional[Tensor] = None

    def grid(self, num_patches: int) -> Tensor:
        """Patch tokens at their grid positions [B, N, D] (zeros where a token was dropped)."""
        patches = self.tokens[:, 1:, :]
        if self.ids_keep is None:
            return patches
        B, _, D = patches.shape
        out = patches.new_zeros(B, num_patches, D)
        return out.scatter(1, self.ids_keep.unsqueeze(-1).expand(-1, -1, D), patches)


def encode(
    encoder: ViTEncoder,
    x: Tensor,
    mask: Optional[Tensor],
    student: str,
    ids: Optional[tuple[Tensor, Tensor]] = None,
    keep: Optional[int] = None,
) -> Encoded:
    """f(T(x)), the one "encode with a mask" of every family: ``drop`` keeps only the visible
    tokens (MAE), ``mask_token`` replaces the removed patches [B, N] (1 = removed) by the
    learnable mask token (C-MAE, SimMIM); ``mask=None`` encodes every patch. ``ids``: the
    ``(ids_keep, ids_restore)`` of ``mask`` when the caller already has them (MAE's
    :func:`~mimlab.nn.ops.random_masking` order, kept for bitwise parity with the reference);
    ``keep``: the patches every row of ``mask`` keeps when known (:func:`~mimlab.nn.ops.
    visible_count`), so that dropping tokens reads nothing from the device."""
    if mask is None:
        return Encoded(encoder.forward_features(x))
    if student == "mask_token":
        return Encoded(encoder.forward_features(x, mask=mask))
    ids_keep, ids_restore = ids if ids is not None else mask_to_ids(mask, keep)
    return Encoded(encoder.forward_features(x, ids_keep=ids_keep), ids_keep, ids_restore)
