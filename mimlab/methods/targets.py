"""Targets of masked prediction (the 'teacher' of the unified view): [B, C, H, W] -> [B, N, C_t].

``build_target(cfg, encoder, mean, std)`` maps ``method.target`` to a module; every target runs
without gradients and returns one vector per *student* patch, row-major over the student grid:

=============  ===================================================================  ==========
target         what                                                                 checkpoint
=============  ===================================================================  ==========
``pixels``     the patches themselves (MAE, SimMIM)                                 --
``teacher``    a frozen network, ``method.teacher`` spec (MaskDistill; see          no
               :func:`mimlab.nn.teachers.build_teacher`; model sources ``mimlab:`` ...)
``hog``        HOG histograms of every patch (MaskFeat), no weights                 no
``ema``        data2vec: EMA copy of the student encoder, average of its top-K      yes
               block outputs, each instance-normalised over the patch tokens
=============  ===================================================================  ==========

Frozen teachers are **not part of the module tree** (:class:`TeacherTarget` keeps them in a
tuple): their weights never enter ``method.state_dict()`` / checkpoints, ``parameters()``,
the optimizer or DistributedDataParallel, while ``.to(device)`` still moves them
(``TeacherTarget._apply``). A run rebuilds its teacher from the spec when it resumes. The EMA
target's weights are ordinary submodule parameters, so they are checkpointed (exact resume).

``mean`` / ``std`` are the per-channel statistics the student's images are normalised with
(teachers de-normalise with them); without them the config's ``data.mean`` / ``data.std`` or the
ImageNet values are assumed (see :func:`mimlab.data.datasets.resolve_stats`).
"""

from __future__ import annotations

import copy
import warnings
from typing import Optional, Sequence

import torch
import torch.nn as nn

from ..core.config import ConfigError, PretrainConfig
from ..data.datasets import resolve_stats
from ..io.checkpoint import CheckpointError
from ..io.sources import SourceError, load_encoder
from ..nn.losses import instance_norm_tokens
from ..nn.models import ViTEncoder
from ..nn.teachers import Size, Teacher, _pair, build_teacher, register_teacher
from .base import ema_update_
from .masked import PixelTarget


# ------------------------------------------------------------------------- frozen teachers
class TeacherTarget(nn.Module):
    """A frozen :class:`~mimlab.nn.teachers.Teacher` as masked-prediction target.

    ``forward(images)``: student-normalised images [B, C, H, W] -> teacher features
    [B, gh * gw, out_dim] (float32) on the student grid ``grid``.

    The teacher is held outside the module tree (see the module docstring): ``self.teacher``
    is not a submodule, so ``state_dict()`` of a method holding this target has no teacher keys.

    Cached features (``method.cache_teacher``, :mod:`mimlab.methods.teacher_cache`): after
    :meth:`attach_cache`, a forward preceded by :meth:`set_batch_indices` returns the cached rows
    of those dataset positions instead of running the teacher. The indices are consumed by that
    one forward; a forward without indices runs the teacher.
    """

    def __init__(self, teacher: Teacher, grid: tuple[int, int], spec: str = ""):
        super().__init__()
        self._frozen = (teacher,)  # a tuple is not registered as a submodule
        self.grid, self.spec = tuple(grid), spec
        self.out_dim = teacher.out_dim
        self.cache = None
        self._indices: Optional[torch.Tensor] = None

    @property
    def teacher(self) -> Teacher:
        return self._frozen[0]

    def _apply(self, fn, recurse: bool = True):
        # .to(device) / .cuda() of the method reach the out-of-tree teacher too
        self.teacher._apply(fn)
        return super()._apply(fn, recurse)

    def attach_cache(self, cache) -> None:
        """Use ``cache`` (a :class:`~mimlab.methods.teacher_cache.TeacherCache`) for lookups."""
        if tuple(cache.features.shape[1:]) != (self.grid[0] * self.grid[1], self.out_dim):
            raise ValueError(
                f"teacher cache {tuple(cache.features.shape)} does not fit grid "
                f"{self.grid} x out_dim {self.out_dim}"
            )
        self.cache = cache

    def set_batch_indices(self, indices: torch.Tensor) -> None:
        """Dataset positions [B] of the next forward's images (cache lookup)."""
        self._indices = indices

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        idx, self._indices = self._indices, None
        if idx is not None and self.cache is not None:
            if idx.shape[0] != images.shape[0]:
                raise ValueError(f"{idx.shape[0]} cache indices for a batch of {images.shape[0]}")
            return self.cache.lookup(idx).to(images.device)  # [B, N, C] float32
        return self.teacher(images, self.grid)

    def extra_repr(self) -> str:
        return (
            f"spec={self.spec!r}, grid={self.grid}, out_dim={self.out_dim}, "
            f"teacher={type(self.teacher).__name__} (frozen, not checkpointed), "
            f"cached={self.cache is not None}"
        )


class SourceTeacher(Teacher):
    """The encoder of any model source (:mod:`mimlab.io.sources`) as a frozen teacher: specs
    ``mimlab:<checkpoint.pt>`` (MAE, MoCo v3, ... pretraining or fine-tuning), ``mae:<file>``,
    ``hf:<dir>``, ``mocov3:<file>`` (``timm:`` teachers are
    :class:`~mimlab.nn.teachers.TimmTeacher`).

    Features are the patch tokens after the encoder's final norm, [B, D, h, w] on the teacher's
    own grid (``out_dim`` = its ``embed_dim``). The teacher runs at its own resolution, or at
    ``teacher_size`` (square; position embeddings resampled as
    :func:`mimlab.io.sources.load_encoder` does). Its input normalisation is the source's own (a
    mimlab checkpoint's recorded data statistics; the student's, with a warning, for pre-schema
    files that recorded none).
    """

    def __init__(
        self,
        spec: str,
        *,
        student_mean: Sequence[float],
        student_std: Sequence[float],
        teacher_size: Optional[Size] = None,
    ):
        size = _pair(teacher_size)
        if size is not None and size[0] != size[1]:
            raise ValueError(f"teacher {spec}: teacher_size must be square, got {teacher_size}")
        try:
            sm = load_encoder(spec, img_size=size[0] if size else None)
        except (SourceError, CheckpointError) as e:
            raise ValueError(str(e)) from None
        mc = sm.model_config
        mean, std = sm.mean, sm.std
        if mean is None or len(mean) != mc.in_chans:
            if len(student_mean) != mc.in_chans:
                raise ValueError(
                    f"teacher {spec}: unknown input normalisation for its "
                    f"{mc.in_chans} channel(s); set data.mean/std when "
                    "pretraining it"
                )
            warnings.warn(
                f"teacher {spec}: pretraining normalisation not recorded, assuming "
                "the student's data.mean/std"
            )
            mean, std = student_mean, student_std
        super().__init__(student_mean, student_std, mc.img_size, mean, std, mc.in_chans)
        self.net = sm.encoder
        self.out_dim = mc.embed_dim
        self.path = spec
        self._freeze()

    def features(self, x: torch.Tensor) -> torch.Tensor:
        t = self.net.forward_features(x)[:, 1:, :]  # [B, h*w, D] after the final norm
        gh, gw = self.net.grid
        return t.transpose(1, 2).reshape(t.shape[0], -1, gh, gw)  # [B, D, h, w]


# ------------------------------------------------------------------------- EMA (data2vec)
class EMATarget(nn.Module):
    """data2vec target (Baevski et al., 2022, Sec. 3.3): an EMA copy of the student encoder
    sees the *full, unmasked* image; the outputs of its top ``K`` blocks (patch tokens, before
    the final norm) are each instance-normalised over the tokens
    (:func:`mimlab.nn.losses.instance_norm_tokens`) and averaged: [B, C, H, W] -> [B, N, D].

    The EMA weights are ordinary parameters (``requires_grad=False``) of this module, so they
    are saved in checkpoints. :meth:`update` moves them towards the online encoder::

        theta_ema <- momentum * theta_ema + (1 - momentum) * theta_online

    and is called by :meth:`MaskedPrediction.after_step` after every optimizer step.
    ``top_k`` larger than the depth uses every block. The momentum is constant (data2vec
    anneals it from 0.999 to 0.9998 over training; not implemented).
    """

    def __init__(self, encoder: ViTEncoder, top_k: int = 6, momentum: float = 0.999):
        super().__init__()
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        if not 0.0 <= momentum <= 1.0:
            raise ValueError(f"EMA momentum must be in [0, 1], got {momentum}")
        self.ema = copy.deepcopy(encoder)
        for p in self.ema.parameters():
            p.requires_grad_(False)
        self.ema.train(False)
        self.top_k = min(top_k, encoder.depth)
        self.momentum = momentum
        self.out_dim = encoder.embed_dim

    def train(self, mode: bool = True) -> "EMATarget":
        super().train(mode)
        self.ema.train(False)  # the target network never uses dropout / drop path
        return self

    @torch.no_grad()
    def update(self, online: nn.Module, momentum: Optional[float] = None) -> None:
        """EMA step towards ``online`` (same architecture): :func:`ema_update_`."""
        ema_update_(self.ema, online, self.momentum if momentum is None else momentum)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        _, blocks = self.ema.forward_features(images, return_blocks=True, apply_norm=False)
        top = [instance_norm_tokens(b[:, 1:, :]) for b in blocks[-self.top_k :]]  # K x [B, N, D]
        return torch.stack(top).mean(0)  # [B, N, D]

    def extra_repr(self) -> str:
        return f"top_k={self.top_k}, momentum={self.momentum}"


# ------------------------------------------------------------------------- factory
def build_target(
    cfg: PretrainConfig,
    encoder: ViTEncoder,
    mean: Optional[Sequence[float]] = None,
    std: Optional[Sequence[float]] = None,
) -> nn.Module:
    """``method.target`` -> target module (see the module docstring).

    ``mean`` / ``std``: the student's image normalisation (needed by frozen teachers); default
    from ``data.mean``/``std`` or ImageNet's statistics (0.5 for non-RGB inputs).
    """
    m = cfg.method
    if m.target == "pixels":
        return PixelTarget(cfg.model.patch_size)
    if m.target == "ema":
        return EMATarget(encoder, m.ema_top_k, m.ema_momentum)
    if m.target in ("teacher", "hog"):
        if mean is None or std is None:
            mean, std = resolve_stats(cfg.data, None, cfg.model.in_chans)
        spec = "hog" if m.target == "hog" else m.teacher.strip()
        kw = {}
        if m.teacher_size is not None and spec.lower() != "hog":
            kw["teacher_size"] = m.teacher_size
        try:
            teacher = build_teacher(spec, list(mean), list(std), **kw)
        except ValueError as e:
            raise ConfigError(f"method.teacher: {e}") from None
        return TeacherTarget(teacher, encoder.grid, spec)
    raise ConfigError(
        f"method.target: '{m.target}' is not available for masked prediction "
        "(pixels | teacher | hog | ema)"
    )


MimlabTeacher = SourceTeacher  # the former name of the ``mimlab:`` teacher


def _source_teacher_builder(kind: str):
    def build(arg, path, **kw) -> Optional[SourceTeacher]:
        if not arg:
            return None
        return SourceTeacher(f"{kind}:{arg if path is None else f'{arg}@{path}'}", **kw)

    return build


for _kind in ("mimlab", "mae", "hf", "mocov3"):  # model sources as teachers (timm: has its own)
    register_teacher(_kind, _source_teacher_builder(_kind))
