"""Siamese methods (Kong & Zhang 2022, "Understanding MIM via Learning Occlusion Invariant
Feature"): two transformations T1 / T2 of the same image, an encoder f, and a similarity
measurement M between f(T1 x) and f(T2 x) (Eq. 1). Each method is a declaration over three
reusable parts:

* :class:`~mimlab.methods.views.ViewMaker` -- the transformations: T1 = patch masking
  (``method.mask``), T2 = ``method.view2`` (complement of T1 = Eq. 6 | independent mask |
  identity | a second crop), plus the Table-5 switches ``method.cutmix`` and
  ``method.color_jitter`` (order, sharing and the leak-free jitter: ``views.py``);
* :func:`encode` -- the student mode: masked tokens dropped (MAE) or replaced by the learnable
  mask token (C-MAE); :class:`Encoded` maps the tokens back to their grid positions;
* the measurement: a shared MAE decoder + l2 (:class:`RelaxedMAE`, R-MAE Eq. 8) or projector /
  predictor + InfoNCE / BYOL against an EMA target (:class:`ContrastiveSiamese`, C-MAE
  Eq. 9-11 and MoCo v3; heads, gathering and token pairs in ``contrastive.py``).

Presets (:data:`mimlab.core.registry.PRESETS`): ``rmae``, ``rmae_indep`` (R-MAE-dagger),
``rmae_identity`` (R-MAE-double-dagger), ``cmae``, ``cmae_cls``, ``cmae_avg``,
``cmae_patch_cls``, ``cmae_byol``, ``cmae_nomask``, ``cmae_nomask_byol``, ``mocov3``.

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

C-MAE (Eq. 9-11): online encoder f (mask tokens: "we adopt learnable mask tokens ... rather
than directly discard the tokens within the masked region"), projector p and predictor q ("2-layer
projector ... and 2-layer predictor, and use GELU as activation layer": Linear -> BatchNorm ->
GELU -> Linear, BatchNorm as in MoCo v3 whose heads the paper follows, "Readers can refer to
[16] for details"; ``method.proj_norm=ln`` for batch-independent heads); target encoder and
target projector are EMA copies ("an online model and a target model whose parameters are EMA
updated by the online model"; ``requires_grad=False``, updated in :meth:`after_step`, momentum
``method.ema_momentum`` = 0.996, "the momentum to update the teacher model is set to 0.996",
constant by default as the paper gives one value; ``method.ema_schedule=cosine`` raises it to 1
like MoCo v3 / BYOL). T1 = random masking, T2 = complement; SimSiam colour jitter applied
independently to each view after masking. The loss is InfoNCE ("the temperature to compute
contrastive loss is set to 0.2") with cosine similarity of ``q(p(z1))`` and ``p'(z2)``.
**Gradients**: the loss reaches the online encoder, projector and predictor through the query
only; the key branch runs under ``torch.no_grad()`` (stop-gradient, as in MoCo v3 / BYOL) and
changes only by EMA.

Token selection (``method.tokens``, Table 3: "apply the loss in Eq. (11) 1) only to the class
token; 2) on the average of all patch tokens; 3) to each patch token respectively; 4) to each
patch token as well as the class token respectively. If multiple tokens are assigned to the
loss, we gather all loss terms by averaging them up"):

* ``patch`` (3): one loss term per query position; the positive is the target token at the same
  position. The paper leaves two things open, offered as options:

  - **queries** (``method.queries``): ``all`` (default) -- every patch token (14 x 14 for
    ViT-B, "to each patch token respectively"; Eq. 11 compares the whole feature maps
    f(T1 x), f(T2 x) and, unlike Eq. 5, has no ``(1 - M)``); ``removed`` -- only the positions
    T1 removes and T2 sees (MAE's loss region). With ``student=drop`` the queries are the
    positions both views see (the only ones with an online and a target token); without patch
    masking, every position.
  - **negatives** (``method.negatives``; Eq. 9's ``sum_j`` does not say over what):
    ``position`` (default) -- the keys at the same position in every image of the global batch;
    ``image`` -- the other query positions of the same image; ``batch`` -- every query token of
    the global batch (computed in chunks of ``method.nce_chunk`` queries, activation-
    checkpointed, so memory is O(chunk x B N) instead of O((B N)^2)). The candidate keys are
    always the query positions' keys. **Why position is the default**: it is the literal
    reading of "apply the loss in Eq. (11) ... to each patch token respectively" -- the same
    instance-wise loss that (1) applies to the class token (MoCo v3, whose negatives are the
    other images), applied at every position, the terms averaged; and it is the one reading in
    which position is no shortcut: both views carry the same position embeddings, and tokens
    holding *only* their sin-cos position embedding (ViT-B: 14 x 14, 768-d, 147 queries,
    tau 0.2) reach a loss of 4.1 with ``image`` negatives, below chance (log 147 = 4.99), and
    below chance with ``batch`` negatives too, while with ``position`` negatives every
    candidate shares the position and such tokens sit exactly at chance (log B;
    tests/test_table5.py). Memory: logits [N, B, B_global].
* ``patch+cls`` (4): ``method.cls_term=instance`` (default) -- the class-token pair gets the
  instance-wise loss of (1) (negatives: the other images' class tokens) and is one more term of
  the average (weight 1 / (queries + 1) per image, "we gather all loss terms by averaging them
  up"); ``cls_term=joint`` -- the class-token pair joins the token set and is contrasted under
  ``method.negatives`` (with ``image`` negatives its negatives are the image's patch tokens and
  it is a negative of theirs). With ``negatives=position`` the two are the same. A third
  reading, 1/2 class token + 1/2 mean of the patch terms, is not offered (the paper averages
  "all loss terms").
* ``cls`` / ``avg`` (1, 2): instance-wise on the class token / on the mean of the patch tokens
  the encoder outputs (with mask tokens: all N; with ``drop``: the visible ones); negatives are
  the other images of the global batch (O(B^2)).

``cmae_nomask`` / ``cmae_nomask_byol`` (Table 4, "if we remove the mask tokens as done in MAE's
encoder"): with complementary views and dropped tokens the online encoder outputs tokens only at
the 25 % of positions T1 keeps and the target encoder only at the 75 % T1 removes: **no patch
position has both**, so the token-wise loss cannot be kept when only the mask tokens are
removed. These presets therefore also change the granularity: instance-wise on averaged tokens
(each branch averages the tokens it sees). The mask-token-only comparison is ``cmae_avg`` vs
``cmae_nomask`` (they differ in ``student`` alone); ``cmae`` vs ``cmae_nomask`` also differs in
granularity (worth 0.3 FT points in Table 3: 82.9 vs 82.6). Where views share positions
(``view2=identity | independent``), ``student=drop tokens=patch`` keeps the token-wise loss
without mask tokens (queries: the positions both views see).

Table 5 without patch masking (``method.mask=none``; "both MAE and C-MAE drop a lot of
performance when removing patch masking"): C-MAE compares two *independently* augmented full
views (own cutmix partner and box, own colour jitter per view; neither view masked, whatever
``view2`` says) token-wise at every position. A composition must leave the views different:
``mask=none`` needs ``cutmix=true`` or ``color_jitter=after_mask | unmasked`` (``whole`` would
jitter both views alike), else it fails at config time (identical views: a trivial objective).

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

**Under DistributedDataParallel** (``torchrun``) the keys of every process are gathered
(``position`` / ``batch`` negatives and the instance-wise terms: negatives come from the global
batch, as MoCo v3's ``concat_all_gather``; ``image`` negatives need none), BatchNorm in the
projector / predictor uses global batch statistics (:class:`~mimlab.methods.contrastive.
SyncBatchNorm1d`, CPU and GPU; no conversion step needed) and each process's loss is its sum of
terms over the global number of terms / world size: two processes give the loss and gradients
of one process on the global batch (tests/test_ddp.py).
"""

from __future__ import annotations

import copy
import dataclasses
import math
from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ..core.config import PretrainConfig
from ..core.registry import check_method
from ..nn.augment import MOCOV3_JITTER, SIMSIAM_JITTER
from ..nn.losses import byol_loss, instance_info_nce, regression_loss, token_info_nce
from ..nn.models import ViTEncoder, build_decoder, build_encoder
from ..nn.ops import patchify
from .base import Encoded, Method, ema_update_, encode
from .contrastive import (
    MLPHead,
    SyncBatchNorm1d,
    gather_rows,
    global_mean,
    query_positions,
    select_positions,
)
from .masked import normalize_target
from .views import ViewMaker, Views

__all__ = [
    "ViewMaker",
    "Views",
    "MLPHead",
    "SyncBatchNorm1d",
    "Encoded",
    "encode",
    "RelaxedMAE",
    "ContrastiveSiamese",
    "check_method",
    "build_siamese",
    "query_positions",
    "select_positions",
]


@torch.no_grad()
def cosine_momentum(base: float, step: int, total_steps: int) -> float:
    """MoCo v3 / BYOL schedule: ``1 - (1 - base) * (1 + cos(pi * step / total)) / 2``."""
    t = min(max(step, 0) / max(total_steps, 1), 1.0)
    return 1.0 - (1.0 - base) * 0.5 * (1.0 + math.cos(math.pi * t))


# ------------------------------------------------------------------------- R-MAE
def rmae_region(mask1: Tensor, mask2: Optional[Tensor]) -> Tensor:
    """Patches of Eq. 8's ``(1 - M)`` that enter the loss: removed by T1 and seen by T2."""
    return mask1 if mask2 is None else mask1 * (1.0 - mask2)


def rmae_distance(
    pred1: Tensor,
    pred2: Tensor,
    region: Tensor,
    kind: str = "l2",
    beta: float = 2.0,
    stopgrad: bool = False,
) -> Tensor:
    """Distance term of Eq. 8 / the measurement of Eq. 5: ``|| (d(z1) - d(z2)) * R ||^2``
    (per-patch mean, averaged over R). ``stopgrad`` detaches the T2 branch."""
    return regression_loss(pred1, pred2.detach() if stopgrad else pred2, region, kind, beta)


class TwoViewMethod(Method):
    """A method on two views T1 x, T2 x made by a :class:`~mimlab.methods.views.ViewMaker`
    (``self.views``): the batch function draws them (:meth:`sample_inputs`), ``forward`` reads
    them (:meth:`given_views`)."""

    views: ViewMaker

    @torch.no_grad()
    def sample_inputs(
        self,
        images: Tensor,
        generator: Optional[torch.Generator] = None,
        noise: Optional[Tensor] = None,
        mask1: Optional[Tensor] = None,
        mask2: Optional[Tensor] = None,
    ) -> dict:
        """T1 / T2 (masks, then cutmix, jitter and crops as the ViewMaker is set) ->
        ``images``, ``x1``, ``x2``, ``mask1``, ``mask2``."""
        mean, std = self.data_stats(images.shape[1])
        v = self.views(images, mean, std, self.training, mask1, mask2, noise, generator)
        return {"images": images, "x1": v.x1, "x2": v.x2, "mask1": v.mask1, "mask2": v.mask2}

    def given_views(
        self,
        images: Tensor,
        x1: Optional[Tensor],
        x2: Optional[Tensor],
        mask1: Optional[Tensor],
        mask2: Optional[Tensor],
        noise: Optional[Tensor] = None,
    ) -> tuple[Views, Optional[int], Optional[int]]:
        """The views ``forward`` works on and the patches each mask keeps per row (None:
        read from the mask): the batch function's, or drawn here when ``forward`` is called
        without ``x1`` / ``x2``."""
        keep1, keep2 = getattr(self.views, "keep1", None), getattr(self.views, "keep2", None)
        if x1 is None or x2 is None:  # called directly: draw the views here
            d = self.sample_inputs(images, None, noise, mask1, mask2)
            x1, x2, mask1, mask2 = d["x1"], d["x2"], d["mask1"], d["mask2"]
            keep1 = keep2 = None  # masks may be the caller's: read their counts
        return Views(x1, x2, mask1, mask2), keep1, keep2


class RelaxedMAE(TwoViewMethod):
    """R-MAE (Eq. 8), see the module docstring. ``forward(images, labels=None, noise=None,
    mask1=None, mask2=None, x1=None, x2=None)`` (the views ``x1``, ``x2`` and their masks as
    :meth:`sample_inputs` drew them; without ``x1`` forward draws the views itself) returns
    ``loss``, ``loss_dist``, ``loss_ae`` and, for the
    reconstruction tools, ``pred`` (d(f(T1 x)), normalised pixels), ``pred2``, ``target``,
    ``mask`` (T1) and ``mask2``."""

    def __init__(
        self,
        encoder: ViTEncoder,
        decoder: nn.Module,
        views: ViewMaker,
        student: str = "drop",
        target_norm: str = "patch",
        loss: str = "l2",
        loss_beta: float = 2.0,
        lam: float = 1.0,
        stopgrad: bool = False,
        data_mean: Optional[Sequence[float]] = None,
        data_std: Optional[Sequence[float]] = None,
    ):
        super().__init__()
        self.set_data_stats(data_mean, data_std)
        self.encoder, self.head, self.views = encoder, decoder, views
        self.student, self.target_norm = student, target_norm
        self.loss_kind, self.loss_beta, self.lam, self.stopgrad = loss, loss_beta, lam, stopgrad

    def reconstruct(self, x: Tensor, mask: Optional[Tensor], keep: Optional[int] = None) -> Tensor:
        """d(f(T(x))): [B, N, p*p*C] predictions of every patch (``keep``: patches ``mask``
        keeps per row, when known)."""
        e = encode(self.encoder, x, mask, self.student, keep=keep)
        return self.head(e.tokens, e.ids_restore)

    def forward(
        self,
        images: Tensor,
        labels: Optional[Tensor] = None,
        noise: Optional[Tensor] = None,
        mask1: Optional[Tensor] = None,
        mask2: Optional[Tensor] = None,
        x1: Optional[Tensor] = None,
        x2: Optional[Tensor] = None,
    ) -> dict:
        v, keep1, keep2 = self.given_views(images, x1, x2, mask1, mask2, noise)
        pred1 = self.reconstruct(v.x1, v.mask1, keep1)
        pred2 = self.reconstruct(v.x2, v.mask2, keep2)
        region = rmae_region(v.mask1, v.mask2)
        with torch.no_grad():
            target = normalize_target(
                patchify(v.x2, self.encoder.patch_size).float(), self.target_norm
            )
        dist = rmae_distance(pred1, pred2, region, self.loss_kind, self.loss_beta, self.stopgrad)
        ae = regression_loss(pred2, target, region, self.loss_kind, self.loss_beta)
        return {
            "loss": dist + self.lam * ae,
            "loss_dist": dist.detach(),
            "loss_ae": ae.detach(),
            "pred": pred1,
            "pred2": pred2,
            "target": target,
            "mask": v.mask1,
            "mask2": v.mask2,
            "region": region,
        }


# ------------------------------------------------------------------------- C-MAE / MoCo v3
def _head(head: nn.Module, x: Tensor, valid: Optional[Tensor]) -> Tensor:
    """``head(x)``; an :class:`MLPHead` also gets ``valid`` (its BatchNorm statistics from
    those rows only), other heads are row-wise."""
    return head(x, valid) if isinstance(head, MLPHead) else head(x)


class ContrastiveSiamese(TwoViewMethod):
    """Online encoder + projector + predictor against an EMA target encoder + projector
    (C-MAE, MoCo v3); see the module docstring. ``forward(images, labels=None, mask1=None,
    mask2=None, x1=None, x2=None)`` (the views as :meth:`sample_inputs` drew them; without
    ``x1`` forward draws them itself) returns ``loss``, ``pos_cos`` (mean cosine of the
    positive pairs) and, when symmetric, ``loss_12`` / ``loss_21``."""

    def __init__(
        self,
        encoder: ViTEncoder,
        projector: nn.Module,
        predictor: nn.Module,
        views: ViewMaker,
        student: str = "mask_token",
        tokens: str = "patch",
        loss: str = "infonce",
        temperature: float = 0.2,
        negatives: str = "position",
        symmetric: bool = False,
        momentum: float = 0.996,
        schedule: str = "fixed",
        queries: str = "all",
        cls_term: str = "instance",
        nce_chunk: int = 1024,
        data_mean: Optional[Sequence[float]] = None,
        data_std: Optional[Sequence[float]] = None,
    ):
        super().__init__()
        self.set_data_stats(data_mean, data_std)
        self.encoder, self.projector, self.predictor, self.views = (
            encoder,
            projector,
            predictor,
            views,
        )
        self.target_encoder = copy.deepcopy(encoder).requires_grad_(False)
        self.target_projector = copy.deepcopy(projector).requires_grad_(False)
        self.student, self.tokens, self.loss_kind = student, tokens, loss
        self.temperature, self.negatives, self.symmetric = temperature, negatives, symmetric
        self.momentum, self.schedule = momentum, schedule
        self.queries, self.cls_term, self.nce_chunk = queries, cls_term, nce_chunk

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

    # ---- per-term losses (this process's terms; keys gathered across processes) ----------
    def instance_terms(self, q: Tensor, k: Tensor) -> Tensor:
        """[B] instance-wise terms of q [B, D] against k [B, D] (negatives: the other images
        of the global batch)."""
        if self.loss_kind == "byol":
            return byol_loss(q, k, reduction="none")
        kg, off = gather_rows(k)
        return instance_info_nce(q, kg, self.temperature, off, reduction="none")

    def token_terms(self, q: Tensor, k: Tensor, sel: Tensor) -> Tensor:
        """[B, N] token-wise terms (zero where ``sel`` is False) of q, k [B, N, D]."""
        if self.loss_kind == "byol":
            return byol_loss(q, k, sel, reduction="none")
        if self.negatives == "image":
            kg, off, selg = k, 0, sel
        else:
            kg, off = gather_rows(k)
            selg, _ = gather_rows(sel)
        return token_info_nce(
            q,
            kg,
            sel,
            self.temperature,
            self.negatives,
            key_mask=selg,
            key_offset=off,
            chunk_size=self.nce_chunk,
            reduction="none",
        )

    def pair_loss(
        self, online: Encoded, target: Encoded, mask_q: Optional[Tensor], mask_k: Optional[Tensor]
    ) -> tuple[Tensor, Tensor]:
        """Measurement between the online view (mask ``mask_q``) and the target view (mask
        ``mask_k``); ``target`` must come from the target encoder (no gradients). Returns
        (loss, mean cosine of the positive pairs)."""
        B = online.tokens.shape[0]
        if self.tokens in ("cls", "avg"):
            if self.tokens == "cls":
                zq, zk = online.tokens[:, 0], target.tokens[:, 0]  # [B, D]
            else:
                zq, zk = online.tokens[:, 1:].mean(1), target.tokens[:, 1:].mean(1)
            q = self.predictor(self.projector(zq))
            with torch.no_grad():
                k = self.target_projector(zk)
            loss = global_mean(self.instance_terms(q, k).sum(), B)
            return loss, F.cosine_similarity(q.detach().float(), k.float(), dim=-1).mean()
        N = self.encoder.num_patches
        dev = online.tokens.device
        sel = query_positions(mask_q, mask_k, self.student, B, N, dev, self.queries)  # [B, N]
        # fixed shapes: every position goes through the heads; the unselected ones are left
        # out of the BatchNorm statistics, the cosine and the loss (no boolean indexing, no
        # host read; a batch without a selected position gives a zero loss)
        every = (mask_q is None and mask_k is None) or (
            self.student == "mask_token" and self.queries == "all"
        )  # known without looking at the masks: every position is selected
        valid = None if every else sel.reshape(B * N)  # [B N]
        with_cls = self.tokens == "patch+cls"
        zq, zk = online.grid(N).flatten(0, 1), target.grid(N).flatten(0, 1)  # [B N, D]
        if with_cls:
            zq = torch.cat([online.tokens[:, 0], zq])  # [B + B N, D]
            zk = torch.cat([target.tokens[:, 0], zk])
            if valid is not None:
                valid = torch.cat([valid.new_ones(B), valid])
        hq = _head(self.predictor, _head(self.projector, zq, valid), valid)
        with torch.no_grad():
            hk = _head(self.target_projector, zk, valid)
        cos_all = F.cosine_similarity(hq.detach().float(), hk.float(), dim=-1)  # [rows]
        if valid is None:
            cos = cos_all.mean()
        else:
            cos = (cos_all * valid).sum() / valid.sum().clamp_min(1)
        if with_cls:
            (cq, hq), (ck, hk) = hq.split([B, B * N]), hk.split([B, B * N])
        keep = sel.unsqueeze(-1)  # [B, N, 1]
        q = torch.where(keep, hq.view(B, N, -1), 0.0)  # [B, N, D']
        k = torch.where(keep, hk.view(B, N, -1), 0.0)
        count = sel.sum()
        if with_cls and self.cls_term == "joint":  # the class token: one more position
            q, k = torch.cat([cq[:, None], q], 1), torch.cat([ck[:, None], k], 1)
            sel = torch.cat([sel.new_ones(B, 1), sel], 1)  # [B, 1 + N]
            count = sel.sum()
        total = self.token_terms(q, k, sel).sum()
        if with_cls and self.cls_term == "instance":
            total = total + self.instance_terms(cq, ck).sum()
            count = count + B
        return global_mean(total, count), cos

    def forward(
        self,
        images: Tensor,
        labels: Optional[Tensor] = None,
        mask1: Optional[Tensor] = None,
        mask2: Optional[Tensor] = None,
        x1: Optional[Tensor] = None,
        x2: Optional[Tensor] = None,
    ) -> dict:
        v, k1, k2 = self.given_views(images, x1, x2, mask1, mask2)
        on1 = encode(self.encoder, v.x1, v.mask1, self.student, keep=k1)
        with torch.no_grad():
            tg2 = encode(self.target_encoder, v.x2, v.mask2, self.student, keep=k2)
        loss, cos = self.pair_loss(on1, tg2, v.mask1, v.mask2)
        out = {"mask": v.mask1, "mask2": v.mask2}
        if self.symmetric:
            on2 = encode(self.encoder, v.x2, v.mask2, self.student, keep=k2)
            with torch.no_grad():
                tg1 = encode(self.target_encoder, v.x1, v.mask1, self.student, keep=k1)
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
    return ViewMaker(
        grid,
        m.mask,
        m.mask_ratio,
        m.view2,
        m.view2_mask_ratio,
        m.color_jitter,
        m.cutmix,
        jitter=MOCOV3_JITTER if crop else SIMSIAM_JITTER,
        jitter2=dataclasses.replace(MOCOV3_JITTER, solarize_p=0.2) if crop else None,
    )


def build_siamese(
    cfg: PretrainConfig,
    data_mean: Optional[Sequence[float]] = None,
    data_std: Optional[Sequence[float]] = None,
) -> Method:
    """R-MAE when ``method.target=online``, else the contrastive siamese method (C-MAE /
    MoCo v3); invalid combinations raise :class:`ConfigError`. Projector / predictor widths:
    ``method.proj_hidden`` (null = 2048 x D / 768) and ``method.proj_dim`` (null = D), i.e. the
    paper's "2048-d for hidden layers, and 768-d for output layers" at ViT-B (D = 768)."""
    m = cfg.method
    check_method(m)
    views = build_views(cfg)
    encoder = build_encoder(cfg.model, mask_token=m.student == "mask_token", drop_path=0.0)
    if m.target == "online":
        return RelaxedMAE(
            encoder,
            build_decoder(cfg.model),
            views,
            m.student,
            m.target_norm,
            m.loss,
            m.loss_beta,
            m.lam,
            m.rmae_stopgrad,
            data_mean,
            data_std,
        )
    D = cfg.model.embed_dim
    hidden = m.proj_hidden or max(1, round(2048 * D / 768))
    out = m.proj_dim or D
    return ContrastiveSiamese(
        encoder,
        MLPHead(D, hidden, out, m.proj_norm),
        MLPHead(out, hidden, out, m.proj_norm),
        views,
        m.student,
        m.tokens,
        m.loss,
        m.temperature,
        m.negatives,
        m.symmetric,
        m.ema_momentum,
        m.ema_schedule,
        m.queries,
        m.cls_term,
        m.nce_chunk,
        data_mean,
        data_std,
    )
