"""Siamese methods (Kong & Zhang 2022, "Understanding MIM via Learning Occlusion Invariant
Feature"): two transformations T1 / T2 of the same image, an encoder f, and a similarity
measurement M between f(T1 x) and f(T2 x) (Eq. 1). Each method is a declaration over three
reusable parts:

* :class:`ViewMaker` -- the transformations: T1 = patch masking (``method.mask``), T2 =
  ``method.view2`` (complement of T1 = Eq. 6 | independent mask | identity | a second crop),
  plus the Table-5 switches ``method.cutmix`` and ``method.color_jitter``;
* :func:`encode` -- the student mode: masked tokens dropped (MAE) or replaced by the learnable
  mask token (C-MAE); :class:`Encoded` maps the tokens back to their grid positions;
* the measurement: a shared MAE decoder + l2 (:class:`RelaxedMAE`, R-MAE Eq. 8) or projector /
  predictor + InfoNCE / BYOL against an EMA target (:class:`ContrastiveSiamese`, C-MAE
  Eq. 9-11 and MoCo v3).

Presets (``config.METHOD_PRESETS``): ``rmae``, ``rmae_indep`` (R-MAE-dagger), ``rmae_identity``
(R-MAE-double-dagger), ``cmae``, ``cmae_cls``, ``cmae_avg``, ``cmae_patch_cls``, ``cmae_byol``,
``cmae_nomask``, ``cmae_nomask_byol``, ``mocov3``.

R-MAE (Eq. 8), mask M = patches T1 keeps, R = patches T1 removes that T2 sees::

    loss = || (d(f(T1 x)) - d(f(T2 x))) * R ||^2  +  lam * || (d(f(T2 x)) - norm_pix(x)) * R ||^2

  (each term a mean over R of the per-patch mean squared error, like MAE's loss). For the
  complement T2, R = every patch T1 removes; for R-MAE-dagger the common part of T1-removed and
  T2-visible patches (as the paper states); for R-MAE-double-dagger (T2(x) = x) again every
  patch T1 removes. phi = phi' (one decoder). **Gradients**: as in Eq. 8 nothing is stopped:
  the distance term back-propagates into *both* branches (encoder and decoder through
  d(f(T1 x)) and through d(f(T2 x))), the constraint into the T2 branch; encoder and decoder
  get the sum. ``method.rmae_stopgrad=true`` detaches d(f(T2 x)) in the distance term only
  (then the T2 branch is trained by the constraint alone, and the T1 branch regresses the T2
  branch's reconstruction). The pixel target never carries gradients.

C-MAE (Eq. 9-11): online encoder f (mask tokens), projector p and predictor q (2-layer MLPs,
Linear -> BatchNorm -> GELU -> Linear by default -- BatchNorm as in MoCo v3, whose heads the
paper follows; ``method.proj_norm=ln`` for batch-independent heads); target encoder and
target projector are EMA copies (``requires_grad=False``, updated in :meth:`after_step`,
momentum ``method.ema_momentum`` = 0.996, constant by default as the paper gives one value;
``method.ema_schedule=cosine`` raises it to 1 like MoCo v3 / BYOL). T1 = random masking, T2 =
complement; SimSiam colour jitter applied independently to each view after masking. The loss is
InfoNCE (tau 0.2) with cosine similarity of ``q(p(z1))`` and ``p'(z2)``. **Gradients**: the
loss reaches the online encoder, projector and predictor through the query only; the key branch
runs under ``torch.no_grad()`` (stop-gradient, as in MoCo v3 / BYOL) and changes only by EMA.

Token selection (``method.tokens``, Table 3):

* ``patch``: one query per patch position that the online view does not see and the target
  view sees (student ``mask_token``: T1-removed & T2-visible -- for the complement every
  removed patch, Eq. 5's ``(1 - M)``); the positive is the target token at the same position;
  negatives (``method.negatives``): ``image`` -- the other selected positions of the same image
  (logits [B, S, S], memory O(B S^2) with S = 0.75 N: ViT-B/16 with 128 images per GPU holds
  2.8 M logits), ``batch`` -- every selected token of the batch (logits [BS, BS], O((B S)^2):
  354 M logits = 1.4 GB in fp32 for 128 x 147 tokens, plus softmax and gradient). Per-token
  losses are averaged. With student ``drop`` (no online token at removed positions) queries are
  the positions *both* views see, which needs a T2 that overlaps T1 (identity / independent).
* ``patch+cls``: the class-token pair joins the token set as one more query (its negatives are
  the other selected tokens), all terms averaged.
* ``cls`` / ``avg``: instance-wise on the class token / on the mean of the patch tokens the
  encoder outputs (with mask tokens: all N; with ``drop``: the visible ones); negatives are the
  other images of the batch (O(B^2)).

``cmae_nomask`` / ``cmae_nomask_byol`` (Table 4, "w/o mask token"): with complementary views and
dropped tokens no patch position has an online token and a target token, so these presets are
instance-wise on averaged tokens (each branch averages the tokens it sees); a token-wise variant
without mask tokens is available as ``student=drop tokens=patch view2=identity``.

The loss is one-directional (Eq. 11: f(T1 x) online, f(T2 x) target; like MAE, the view that
misses 75 % predicts) unless ``method.symmetric`` (MoCo v3, which averages both directions; for
C-MAE the swapped direction has the 25 %-masked view predict the other 25 %, at twice the
encoder cost). MoCo v3 here: two crop (scale 0.08-1, flip) + colour-jitter
(MoCo v3 strengths; second view solarised with p 0.2; no blur) views made on the batch tensor,
no masking, EMA 0.99 -> 1 (cosine), 2-layer projector and predictor (MoCo v3 uses a 3-layer
projector with a final BN and 4096/256 widths), symmetric InfoNCE on the class token without
MoCo v3's ``2 tau`` loss scale.

The crops come on top of the data loader's own ``RandomResizedCrop`` (``data.crop_scale``,
``data.hflip``); set ``data.crop_scale=[1,1] data.hflip=false`` for exactly MoCo v3's crops.

Under DistributedDataParallel negatives are the process's own tokens / images (no all-gather of
keys across GPUs as MoCo v3 does) and BatchNorm in the heads uses per-process statistics (no
SyncBatchNorm; it needs more than one token per batch in training); the target projector keeps
its own running statistics.
"""
from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ..augment import (MOCOV3_JITTER, SIMSIAM_JITTER, JitterSpec, color_jitter_batch,
                       cutmix_batch, random_resized_crop_batch)
from ..config import ConfigError, MethodConfig, PretrainConfig
from ..losses import (byol_loss, instance_info_nce, masked_mean, regression_loss,
                      token_info_nce)
from ..models import ViTEncoder, build_decoder, build_encoder
from ..ops import block_masking, gather_tokens, mask_to_ids, patchify, random_masking
from .base import Method
from .masked import normalize_target

MASKS = ("random", "block", "none")
VIEW2 = ("none", "complement", "independent", "identity", "crop")
JITTERS = ("none", "after_mask", "whole", "unmasked")
TOKENS = ("patch", "patch+cls", "cls", "avg")
NEGATIVES = ("image", "batch")
CONTRASTIVE_LOSSES = ("infonce", "byol")
REGRESSION_LOSSES = ("l2", "l1", "smooth_l1", "cosine")
STUDENTS = ("drop", "mask_token")


# ------------------------------------------------------------------------- config checks
def is_siamese_config(m: MethodConfig) -> bool:
    """Same rule as :func:`mimlab.methods.is_siamese`."""
    return m.view2 != "none" or m.loss in CONTRASTIVE_LOSSES or m.target == "online"


def _one_of(m: MethodConfig, key: str, choices: Sequence[str]) -> None:
    v = getattr(m, key)
    if v not in choices:
        raise ConfigError(f"method.{key}: '{v}' is not one of {' | '.join(choices)}")


def check_method(m: MethodConfig) -> None:
    """Invalid method combinations fail here with one line (called by ``config.validate`` and
    :func:`build_siamese`). Checks the augmentation switches for every method and the
    siamese combinations when the method is siamese."""
    _one_of(m, "mask", MASKS)
    _one_of(m, "view2", VIEW2)
    _one_of(m, "color_jitter", JITTERS)
    _one_of(m, "ema_schedule", ("fixed", "cosine"))
    _one_of(m, "proj_norm", ("bn", "ln", "none"))
    if getattr(m, "cache_teacher", False) and (m.cutmix or m.color_jitter == "whole"):
        raise ConfigError("method.cache_teacher=true stores teacher features of un-augmented "
                          "images: it cannot be combined with method.cutmix=true or "
                          "method.color_jitter=whole (they change the target images)")
    if not is_siamese_config(m):
        return
    _one_of(m, "student", STUDENTS)
    if m.view2 == "none":
        raise ConfigError(f"method.loss={m.loss} / target={m.target} is a siamese method and "
                          "needs a second view: set method.view2=complement | independent | "
                          "identity | crop")
    if m.view2 in ("complement", "independent") and m.mask == "none":
        raise ConfigError(f"method.view2={m.view2} needs T1 patch masking (method.mask=random | "
                          "block); with method.mask=none there is nothing to complement")
    if m.view2 == "independent" and not 0.0 < m.view2_mask_ratio < 1.0:
        raise ConfigError(f"method.view2_mask_ratio must be in (0, 1), got {m.view2_mask_ratio}")
    if m.target == "online":  # R-MAE
        if m.loss not in REGRESSION_LOSSES:
            raise ConfigError(f"R-MAE (method.target=online) compares decoder reconstructions: "
                              f"method.loss must be {' | '.join(REGRESSION_LOSSES)}, got "
                              f"'{m.loss}' (contrastive losses need method.target=ema)")
        if m.head != "decoder":
            raise ConfigError(f"R-MAE (method.target=online) needs method.head=decoder (the "
                              f"shared decoder of Eq. 8), got '{m.head}'")
        if m.mask == "none":
            raise ConfigError("R-MAE (method.target=online) needs T1 patch masking: "
                              "method.mask=random | block")
        if m.view2 == "crop":
            raise ConfigError("R-MAE (method.target=online) compares reconstructions of the same "
                              "image: method.view2 must be complement | independent | identity")
        if m.color_jitter in ("after_mask", "unmasked"):
            raise ConfigError(f"R-MAE compares reconstructions of one image: "
                              f"method.color_jitter must be none | whole, got '{m.color_jitter}'")
        if m.symmetric:
            raise ConfigError("method.symmetric applies to infonce / byol siamese methods, not "
                              "R-MAE (method.target=online)")
        return
    # contrastive siamese (C-MAE, MoCo v3)
    if m.loss not in CONTRASTIVE_LOSSES:
        raise ConfigError(f"a siamese method with method.target={m.target} needs method.loss="
                          f"infonce | byol (got '{m.loss}'); R-MAE regression is target=online")
    if m.target != "ema":
        raise ConfigError(f"method.loss={m.loss} compares the online branch with an EMA target "
                          f"encoder: set method.target=ema (got '{m.target}')")
    if m.head != "mlp":
        raise ConfigError(f"method.loss={m.loss} compares projected embeddings: set "
                          f"method.head=mlp (projector + predictor), got '{m.head}'")
    _one_of(m, "tokens", TOKENS)
    _one_of(m, "negatives", NEGATIVES)
    if not 0.0 <= m.ema_momentum <= 1.0:
        raise ConfigError(f"method.ema_momentum must be in [0, 1], got {m.ema_momentum}")
    if m.temperature <= 0:
        raise ConfigError(f"method.temperature must be > 0, got {m.temperature}")
    for k in ("proj_hidden", "proj_dim"):
        if getattr(m, k) is not None and getattr(m, k) < 1:
            raise ConfigError(f"method.{k} must be >= 1 (or null), got {getattr(m, k)}")
    if m.tokens in ("patch", "patch+cls"):
        if m.view2 == "crop":
            raise ConfigError("method.tokens=patch pairs tokens at the same position, but "
                              "view2=crop views do not share positions: use tokens=cls | avg")
        if m.student == "drop" and m.view2 == "complement":
            raise ConfigError("method.tokens=patch with method.student=drop: complementary views "
                              "share no visible position; use student=mask_token, tokens=avg | "
                              "cls, or view2=identity | independent")
        if m.student == "mask_token" and m.mask == "none":
            raise ConfigError("method.tokens=patch with student=mask_token predicts the patches "
                              "T1 removes, but method.mask=none removes none")
        if m.symmetric and m.view2 == "identity" and m.student == "mask_token":
            raise ConfigError("method.symmetric=true with view2=identity: the swapped direction "
                              "has no removed patch to predict; set method.symmetric=false")


# ------------------------------------------------------------------------- views
@dataclass
class Views:
    """The two transformed inputs: images [B, C, H, W] and patch masks [B, N] (float,
    1 = removed; ``None`` = the view removes nothing)."""
    x1: Tensor
    x2: Tensor
    mask1: Optional[Tensor]
    mask2: Optional[Tensor]


class ViewMaker:
    """T1 / T2 of the siamese form plus the Table-5 augmentations.

    Order: cutmix (shared by both views) -> colour jitter ``whole`` (shared) -> crops
    (``view2=crop``: two independent crops) -> masks -> colour jitter ``after_mask`` (each view
    its own parameters; the masked patches are hidden anyway, so jittering the whole view
    equals jittering the masked view) or ``unmasked`` (the online view T1 only).
    Augmentations run only in training mode (``train=True``).
    """

    def __init__(self, grid: tuple[int, int], masking: str = "random", mask_ratio: float = 0.75,
                 view2: str = "complement", view2_mask_ratio: float = 0.25,
                 color_jitter: str = "none", cutmix: bool = False,
                 jitter: JitterSpec = SIMSIAM_JITTER, jitter2: Optional[JitterSpec] = None,
                 crop_scale: tuple[float, float] = (0.08, 1.0)):
        self.grid, self.num_patches = grid, grid[0] * grid[1]
        self.masking, self.mask_ratio = masking, mask_ratio
        self.view2, self.view2_mask_ratio = view2, view2_mask_ratio
        self.color_jitter, self.cutmix = color_jitter, cutmix
        self.jitter, self.jitter2 = jitter, jitter2 or jitter
        self.crop_scale = crop_scale

    def sample_mask(self, B: int, device, kind: str, ratio: float,
                    noise: Optional[Tensor] = None) -> Optional[Tensor]:
        if kind == "none":
            return None
        if kind == "random":
            if noise is None:
                noise = torch.rand(B, self.num_patches, device=device)
            return random_masking(noise, ratio)[1]
        if kind == "block":
            return block_masking(B, self.grid, ratio, device=device)
        raise ValueError(f"unknown masking '{kind}' ({' | '.join(MASKS)})")

    def __call__(self, images: Tensor, mean=None, std=None, train: bool = True,
                 mask1: Optional[Tensor] = None, mask2: Optional[Tensor] = None,
                 noise: Optional[Tensor] = None) -> Views:
        B, dev = images.shape[0], images.device
        x = images
        if train and self.cutmix:
            x = cutmix_batch(x)
        if train and self.color_jitter == "whole":
            x = color_jitter_batch(x, mean, std, self.jitter)
        x1 = x2 = x
        if self.view2 == "crop" and train:
            x1 = random_resized_crop_batch(x, self.crop_scale)
            x2 = random_resized_crop_batch(x, self.crop_scale)
        if mask1 is None:
            mask1 = self.sample_mask(B, dev, self.masking, self.mask_ratio, noise)
        if mask2 is None:
            if self.view2 == "complement":
                mask2 = 1.0 - mask1
            elif self.view2 == "independent":
                mask2 = self.sample_mask(B, dev, "random", self.view2_mask_ratio)
        if train and self.color_jitter == "after_mask":
            x1 = color_jitter_batch(x1, mean, std, self.jitter)
            x2 = color_jitter_batch(x2, mean, std, self.jitter2)
        elif train and self.color_jitter == "unmasked":
            x1 = color_jitter_batch(x1, mean, std, self.jitter)
        return Views(x1, x2, mask1, mask2)


# ------------------------------------------------------------------------- encoding
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


def encode(encoder: ViTEncoder, x: Tensor, mask: Optional[Tensor], student: str) -> Encoded:
    """f(T(x)): ``drop`` keeps only the visible tokens (MAE), ``mask_token`` replaces the
    removed patches by the learnable mask token (C-MAE); ``mask=None`` encodes every patch."""
    if mask is None:
        return Encoded(encoder.forward_features(x))
    if student == "mask_token":
        return Encoded(encoder.forward_features(x, mask=mask))
    ids_keep, ids_restore = mask_to_ids(mask)
    return Encoded(encoder.forward_features(x, ids_keep=ids_keep), ids_keep, ids_restore)


def _data_stats(method: nn.Module, C: int):
    mean = getattr(method, "data_mean", None)
    std = getattr(method, "data_std", None)
    if mean is None or std is None or len(mean) != C:
        return [0.5] * C, [0.5] * C
    return list(mean), list(std)


@torch.no_grad()
def ema_update_(target: nn.Module, online: nn.Module, momentum: float) -> None:
    """``theta_t <- momentum * theta_t + (1 - momentum) * theta_o`` for every parameter pair
    (same architecture). Buffers are not touched (the target's BatchNorm statistics are its
    own, as in MoCo v3)."""
    tp, op = list(target.parameters()), list(online.parameters())
    if len(tp) != len(op):
        raise ValueError("EMA target and online networks have different parameters")
    for t, o in zip(tp, op):
        t.mul_(momentum).add_(o.detach(), alpha=1.0 - momentum)


def cosine_momentum(base: float, step: int, total_steps: int) -> float:
    """MoCo v3 / BYOL schedule: ``1 - (1 - base) * (1 + cos(pi * step / total)) / 2``."""
    t = min(max(step, 0) / max(total_steps, 1), 1.0)
    return 1.0 - (1.0 - base) * 0.5 * (1.0 + math.cos(math.pi * t))


# ------------------------------------------------------------------------- R-MAE
def rmae_region(mask1: Tensor, mask2: Optional[Tensor]) -> Tensor:
    """Patches of Eq. 8's ``(1 - M)`` that enter the loss: removed by T1 and seen by T2."""
    return mask1 if mask2 is None else mask1 * (1.0 - mask2)


def rmae_distance(pred1: Tensor, pred2: Tensor, region: Tensor, kind: str = "l2",
                  beta: float = 2.0, stopgrad: bool = False) -> Tensor:
    """Distance term of Eq. 8 / the measurement of Eq. 5: ``|| (d(z1) - d(z2)) * R ||^2``
    (per-patch mean, averaged over R). ``stopgrad`` detaches the T2 branch."""
    return regression_loss(pred1, pred2.detach() if stopgrad else pred2, region, kind, beta)


class RelaxedMAE(Method):
    """R-MAE (Eq. 8), see the module docstring. ``forward(images, labels=None, noise=None,
    mask1=None, mask2=None)`` returns ``loss``, ``loss_dist``, ``loss_ae`` and, for the
    reconstruction tools, ``pred`` (d(f(T1 x)), normalised pixels), ``pred2``, ``target``,
    ``mask`` (T1) and ``mask2``."""

    def __init__(self, encoder: ViTEncoder, decoder: nn.Module, views: ViewMaker,
                 student: str = "drop", target_norm: str = "patch", loss: str = "l2",
                 loss_beta: float = 2.0, lam: float = 1.0, stopgrad: bool = False):
        super().__init__()
        self.encoder, self.head, self.views = encoder, decoder, views
        self.student, self.target_norm = student, target_norm
        self.loss_kind, self.loss_beta, self.lam, self.stopgrad = loss, loss_beta, lam, stopgrad

    def reconstruct(self, x: Tensor, mask: Optional[Tensor]) -> Tensor:
        """d(f(T(x))): [B, N, p*p*C] predictions of every patch."""
        e = encode(self.encoder, x, mask, self.student)
        return self.head(e.tokens, e.ids_restore)

    def forward(self, images: Tensor, labels: Optional[Tensor] = None,
                noise: Optional[Tensor] = None, mask1: Optional[Tensor] = None,
                mask2: Optional[Tensor] = None) -> dict:
        mean, std = _data_stats(self, images.shape[1])
        v = self.views(images, mean, std, self.training, mask1, mask2, noise)
        pred1 = self.reconstruct(v.x1, v.mask1)
        pred2 = self.reconstruct(v.x2, v.mask2)
        region = rmae_region(v.mask1, v.mask2)
        with torch.no_grad():
            target = normalize_target(patchify(v.x2, self.encoder.patch_size).float(),
                                      self.target_norm)
        dist = rmae_distance(pred1, pred2, region, self.loss_kind, self.loss_beta, self.stopgrad)
        ae = regression_loss(pred2, target, region, self.loss_kind, self.loss_beta)
        return {"loss": dist + self.lam * ae, "loss_dist": dist.detach(), "loss_ae": ae.detach(),
                "pred": pred1, "pred2": pred2, "target": target, "mask": v.mask1,
                "mask2": v.mask2, "region": region}


# ------------------------------------------------------------------------- C-MAE / MoCo v3
class MLPHead(nn.Module):
    """2-layer head ``Linear -> norm -> GELU -> Linear`` on [..., d_in] (tokens are flattened,
    so BatchNorm normalises over every token of the batch)."""

    def __init__(self, d_in: int, hidden: int, d_out: int, norm: str = "bn"):
        super().__init__()
        self.fc1 = nn.Linear(d_in, hidden, bias=norm != "bn")
        self.norm = {"bn": lambda: nn.BatchNorm1d(hidden), "ln": lambda: nn.LayerNorm(hidden),
                     "none": nn.Identity}[norm]()
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, d_out)

    def forward(self, x: Tensor) -> Tensor:
        shape = x.shape
        h = self.act(self.norm(self.fc1(x.reshape(-1, shape[-1]))))
        return self.fc2(h).reshape(*shape[:-1], -1)


def query_positions(mask_q: Optional[Tensor], mask_k: Optional[Tensor], student: str,
                    B: int, N: int, device) -> Tensor:
    """[B, N] bool: positions whose online token (view with ``mask_q``) is a query and whose
    target token (view with ``mask_k``) is its key. ``mask_token``: removed in the online view
    and seen by the target view; ``drop``: seen by both."""
    removed = mask_q.bool() if mask_q is not None else torch.zeros(B, N, dtype=torch.bool,
                                                                    device=device)
    seen_k = ~mask_k.bool() if mask_k is not None else torch.ones(B, N, dtype=torch.bool,
                                                                   device=device)
    return (removed if student == "mask_token" else ~removed) & seen_k


def select_positions(sel: Tensor) -> tuple[Tensor, Tensor]:
    """[B, N] bool -> (idx [B, S], valid [B, S]): the selected positions of each row in grid
    order, padded to S = max count (``valid`` False on padding)."""
    counts = sel.sum(1)
    S = int(counts.max())
    order = torch.argsort((~sel).to(torch.int8), dim=1, stable=True)
    idx = order[:, :S]
    valid = torch.arange(S, device=sel.device).unsqueeze(0) < counts.unsqueeze(1)
    return idx, valid


def padded_image_nce(q: Tensor, k: Tensor, valid: Tensor, temperature: float) -> Tensor:
    """Token-wise InfoNCE with per-image negatives when images have different numbers of
    tokens: padded keys are excluded from the softmax, padded queries from the mean. Equals
    ``token_info_nce(q, k, None, temperature, 'image')`` when every token is valid."""
    qn = F.normalize(q.float(), dim=-1)
    kn = F.normalize(k.float(), dim=-1)
    logits = torch.bmm(qn, kn.transpose(1, 2)) / temperature            # [B, S, S]
    logits = logits.masked_fill(~valid.unsqueeze(1), -1e9)
    B, S, _ = logits.shape
    tgt = torch.arange(S, device=q.device).repeat(B)
    per = F.cross_entropy(logits.reshape(B * S, S), tgt, reduction="none").view(B, S)
    return masked_mean(per, valid)


class ContrastiveSiamese(Method):
    """Online encoder + projector + predictor against an EMA target encoder + projector
    (C-MAE, MoCo v3); see the module docstring. ``forward(images, labels=None, mask1=None,
    mask2=None)`` returns ``loss``, ``pos_cos`` (mean cosine of the positive pairs) and, when
    symmetric, ``loss_12`` / ``loss_21``."""

    def __init__(self, encoder: ViTEncoder, projector: nn.Module, predictor: nn.Module,
                 views: ViewMaker, student: str = "mask_token", tokens: str = "patch",
                 loss: str = "infonce", temperature: float = 0.2, negatives: str = "image",
                 symmetric: bool = False, momentum: float = 0.996, schedule: str = "fixed"):
        super().__init__()
        self.encoder, self.projector, self.predictor, self.views = (encoder, projector,
                                                                     predictor, views)
        self.target_encoder = copy.deepcopy(encoder).requires_grad_(False)
        self.target_projector = copy.deepcopy(projector).requires_grad_(False)
        self.student, self.tokens, self.loss_kind = student, tokens, loss
        self.temperature, self.negatives, self.symmetric = temperature, negatives, symmetric
        self.momentum, self.schedule = momentum, schedule

    def momentum_at(self, step: int, total_steps: int) -> float:
        """Momentum used after optimizer step ``step`` (1-based): constant, or the cosine
        schedule evaluated at the iteration index ``step - 1``."""
        if self.schedule == "cosine":
            return cosine_momentum(self.momentum, step - 1, total_steps)
        return self.momentum

    @torch.no_grad()
    def after_step(self, step: int, total_steps: int) -> None:
        m = self.momentum_at(step, total_steps)
        ema_update_(self.target_encoder, self.encoder, m)
        ema_update_(self.target_projector, self.projector, m)

    def _similarity(self, q: Tensor, k: Tensor, valid: Optional[Tensor]) -> Tensor:
        if self.loss_kind == "byol":
            return byol_loss(q, k, valid)
        if q.ndim == 2:
            return instance_info_nce(q, k, self.temperature)
        if valid is None or bool(valid.all()):
            return token_info_nce(q, k, None, self.temperature, self.negatives)
        if self.negatives == "batch":
            return token_info_nce(q, k, valid, self.temperature, "batch")
        return padded_image_nce(q, k, valid, self.temperature)

    def pair_loss(self, online: Encoded, target: Encoded, mask_q: Optional[Tensor],
                  mask_k: Optional[Tensor]) -> tuple[Tensor, Tensor]:
        """Measurement between the online view (mask ``mask_q``) and the target view (mask
        ``mask_k``); ``target`` must come from the target encoder (no gradients)."""
        valid = None
        if self.tokens == "cls":
            zq, zk = online.tokens[:, 0], target.tokens[:, 0]
        elif self.tokens == "avg":
            zq, zk = online.tokens[:, 1:].mean(1), target.tokens[:, 1:].mean(1)
        else:
            B, N = online.tokens.shape[0], self.encoder.num_patches
            sel = query_positions(mask_q, mask_k, self.student, B, N, online.tokens.device)
            idx, valid = select_positions(sel)
            if idx.shape[1] == 0:  # no position qualifies anywhere in the batch
                zero = online.tokens.float().sum() * 0.0
                return zero, zero.detach()
            zq = gather_tokens(online.grid(N), idx)
            zk = gather_tokens(target.grid(N), idx)
            if self.tokens == "patch+cls":
                zq = torch.cat([online.tokens[:, :1], zq], 1)
                zk = torch.cat([target.tokens[:, :1], zk], 1)
                valid = torch.cat([valid.new_ones(B, 1), valid], 1)
        q = self.predictor(self.projector(zq))
        with torch.no_grad():
            k = self.target_projector(zk)
        loss = self._similarity(q, k, valid)
        cos = F.cosine_similarity(q.detach().float(), k.float(), dim=-1)
        return loss, (cos.mean() if valid is None else cos[valid].mean())

    def forward(self, images: Tensor, labels: Optional[Tensor] = None,
                mask1: Optional[Tensor] = None, mask2: Optional[Tensor] = None) -> dict:
        mean, std = _data_stats(self, images.shape[1])
        v = self.views(images, mean, std, self.training, mask1, mask2)
        on1 = encode(self.encoder, v.x1, v.mask1, self.student)
        with torch.no_grad():
            tg2 = encode(self.target_encoder, v.x2, v.mask2, self.student)
        loss, cos = self.pair_loss(on1, tg2, v.mask1, v.mask2)
        out = {"mask": v.mask1, "mask2": v.mask2}
        if self.symmetric:
            on2 = encode(self.encoder, v.x2, v.mask2, self.student)
            with torch.no_grad():
                tg1 = encode(self.target_encoder, v.x1, v.mask1, self.student)
            loss21, cos21 = self.pair_loss(on2, tg1, v.mask2, v.mask1)
            out.update(loss_12=loss.detach(), loss_21=loss21.detach())
            loss, cos = 0.5 * (loss + loss21), 0.5 * (cos + cos21)
        out.update(loss=loss, pos_cos=cos)
        return out


# ------------------------------------------------------------------------- builder
def build_views(cfg: PretrainConfig) -> ViewMaker:
    m = cfg.method
    grid = (cfg.model.img_size // cfg.model.patch_size,) * 2
    crop = m.view2 == "crop"
    return ViewMaker(grid, m.mask, m.mask_ratio, m.view2, m.view2_mask_ratio, m.color_jitter,
                     m.cutmix, jitter=MOCOV3_JITTER if crop else SIMSIAM_JITTER,
                     jitter2=dataclasses.replace(MOCOV3_JITTER, solarize_p=0.2) if crop else None)


def build_siamese(cfg: PretrainConfig) -> Method:
    """R-MAE when ``method.target=online``, else the contrastive siamese method (C-MAE /
    MoCo v3); invalid combinations raise :class:`ConfigError`."""
    m = cfg.method
    check_method(m)
    views = build_views(cfg)
    encoder = build_encoder(cfg.model, mask_token=m.student == "mask_token", drop_path=0.0)
    if m.target == "online":
        return RelaxedMAE(encoder, build_decoder(cfg.model), views, m.student, m.target_norm,
                          m.loss, m.loss_beta, m.lam, m.rmae_stopgrad)
    D = cfg.model.embed_dim
    hidden = m.proj_hidden or max(1, round(2048 * D / 768))
    out = m.proj_dim or D
    return ContrastiveSiamese(encoder, MLPHead(D, hidden, out, m.proj_norm),
                              MLPHead(out, hidden, out, m.proj_norm), views, m.student, m.tokens,
                              m.loss, m.temperature, m.negatives, m.symmetric, m.ema_momentum,
                              m.ema_schedule)
