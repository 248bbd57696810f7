"""Loss functions and target normalisations for masked image modeling.

Every function here is small and pure: it never modifies its inputs in place, never detaches
anything (stop-gradient on a target is the caller's decision: compute teacher / EMA targets
under ``torch.no_grad()`` or call ``.detach()``), and returns a 0-dim tensor that keeps the
autograd graph. All of them work under ``torch.autocast``: reductions and softmaxes are done in
float32 (half-precision inputs are upcast), while float64 inputs stay float64.

Shapes use ``B`` = batch, ``N`` = tokens per image, ``D``/``C`` = channels, ``M`` = number of
query/key pairs. A *mask* is a ``[B, N]`` tensor (bool, int or float) in which 1 marks a token
that counts in the loss, i.e. in MAE terms the *masked* (hidden, reconstructed) patches.

Paper references:

* MAE (He et al., 2022), Eq. (3) of Kong & Zhang: l2 on the masked patches, optional per-patch
  pixel normalisation (``norm_pix_loss``) -> :func:`regression_loss`, :func:`patch_norm_target`.
* C-MAE (Kong & Zhang, "Understanding Masked Image Modeling via Learning Occlusion Invariant
  Feature", 2022), Eq. (9)-(11): InfoNCE with cosine similarity of predictor/projector outputs,
  applied token-wise with negatives at the same position / in the same image / in the whole
  batch (chunked) -> :func:`info_nce`, :func:`token_info_nce`, :func:`chunked_info_nce`,
  :func:`instance_info_nce`. Keys may hold more images than queries (keys gathered from every
  process under DistributedDataParallel: ``key_offset``).
* MaskDistill (Peng et al., "A Unified View of Masked Image Modeling", 2022): smooth-l1
  regression of layer-normalised teacher features at masked positions ->
  :func:`regression_loss` (``kind='smooth_l1'``, ``beta=2.0``), :func:`layernorm_target`.
* data2vec (Baevski et al., 2022): instance-normalised teacher targets ->
  :func:`instance_norm_tokens`.
* BYOL (Grill et al., 2020): ``2 - 2 cos(p, z)`` -> :func:`byol_loss`.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import Tensor

from ..core.registry import NEGATIVES

__all__ = [
    "masked_mean",
    "regression_loss",
    "info_nce",
    "token_info_nce",
    "instance_info_nce",
    "chunked_info_nce",
    "NEGATIVES",
    "byol_loss",
    "layernorm_target",
    "patch_norm_target",
    "instance_norm_tokens",
    "REGRESSION_KINDS",
]

REGRESSION_KINDS = ("l2", "l1", "smooth_l1", "cosine")


def _f32(t: Tensor) -> Tensor:
    """Upcast float16/bfloat16 to float32 (out of place); other dtypes are returned as is."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def _check_mask(mask: Tensor, shape: torch.Size, what: str) -> None:
    if tuple(mask.shape) != tuple(shape):
        raise ValueError(f"{what}: mask shape {tuple(mask.shape)} does not match {tuple(shape)}")


# --------------------------------------------------------------------------------------
# Reductions
# --------------------------------------------------------------------------------------
def masked_mean(per_token: Tensor, mask: Optional[Tensor] = None, eps: float = 1e-6) -> Tensor:
    """Weighted mean of ``per_token`` over the entries where ``mask`` is non-zero.

    Computes ``sum(per_token * mask) / max(sum(mask), eps)`` (the reduction of MAE's Eq. (3):
    the loss is averaged over removed patches only).

    Args:
        per_token: ``[B, N]`` (any shape) per-token values, e.g. a per-patch loss.
        mask: same shape as ``per_token``; bool/int/float, 1 = counts, 0 = ignored. Float
            values act as weights. ``None`` means a plain mean over all entries.
        eps: lower bound of the denominator.

    Returns:
        0-dim tensor (float32 for half-precision inputs). Entries with ``mask == 0`` do not
        influence the value (even if they are inf/NaN) and get zero gradient. If the mask sums
        to 0 the result is zero times the (masked) sum: still attached to the graph (gradient
        zero), no NaN. No host-device synchronisation is needed.
    """
    per_token = _f32(per_token)
    if mask is None:
        return per_token.mean()
    _check_mask(mask, per_token.shape, "masked_mean")
    m = mask.to(per_token.dtype)
    keep = mask != 0
    num = (per_token.masked_fill(~keep, 0.0) * m).sum()
    den = m.sum()
    return torch.where(den > 0, num / den.clamp_min(eps), num * 0.0)


# --------------------------------------------------------------------------------------
# Regression (MAE, R-MAE, MaskDistill)
# --------------------------------------------------------------------------------------
def regression_loss(
    pred: Tensor,
    target: Tensor,
    mask: Optional[Tensor] = None,
    kind: str = "l2",
    beta: float = 2.0,
) -> Tensor:
    """Per-token regression loss averaged over the masked tokens.

    Each kind gives a per-token value ``[B, N]`` that is then reduced with
    :func:`masked_mean`:

    * ``'l2'``: ``mean_D (pred - target)^2`` -- MAE, Eq. (3) of Kong & Zhang (mean squared
      error per patch, averaged over the removed patches).
    * ``'l1'``: ``mean_D |pred - target|``.
    * ``'smooth_l1'``: ``mean_D smooth_l1(pred - target; beta)`` with the semantics of
      :func:`torch.nn.functional.smooth_l1_loss` (``0.5 x^2 / beta`` if ``|x| < beta``, else
      ``|x| - 0.5 beta``); MaskDistill uses ``beta = 2.0``.
    * ``'cosine'``: ``1 - cos(pred, target)`` over D.

    Args:
        pred: ``[B, N, D]`` predictions (any ``[..., D]``).
        target: same shape as ``pred``. Not detached here.
        mask: ``[B, N]`` (= ``pred.shape[:-1]``), 1 = token counts; ``None`` = all tokens.
        kind: one of ``'l2' | 'l1' | 'smooth_l1' | 'cosine'``.
        beta: smooth-l1 threshold (only for ``kind='smooth_l1'``; must be > 0).

    Returns:
        0-dim tensor.
    """
    if pred.shape != target.shape:
        raise ValueError(
            f"regression_loss: pred {tuple(pred.shape)} vs target {tuple(target.shape)}"
        )
    pred, target = _f32(pred), _f32(target)
    if kind == "l2":
        per_token = (pred - target).pow(2).mean(dim=-1)
    elif kind == "l1":
        per_token = (pred - target).abs().mean(dim=-1)
    elif kind == "smooth_l1":
        if beta <= 0:
            raise ValueError(f"regression_loss: smooth_l1 needs beta > 0, got {beta}")
        per_token = F.smooth_l1_loss(pred, target, reduction="none", beta=beta).mean(dim=-1)
    elif kind == "cosine":
        per_token = 1.0 - F.cosine_similarity(pred, target, dim=-1, eps=1e-8)
    else:
        raise ValueError(
            f"regression_loss: unknown kind {kind!r}, expected one of {REGRESSION_KINDS}"
        )
    return masked_mean(per_token, mask)


# --------------------------------------------------------------------------------------
# Contrastive (C-MAE, MoCo v3)
# --------------------------------------------------------------------------------------
def info_nce(q: Tensor, k: Tensor, temperature: float = 0.2) -> Tensor:
    """InfoNCE between ``M`` query/key pairs (C-MAE Eq. (9) with the cosine similarity Eq. (10)).

    ``q`` and ``k`` are l2-normalised along D, ``logits = q @ k.T / temperature`` (``[M, M]``)
    and the loss is the cross-entropy with targets ``arange(M)``::

        L = mean_i -log( exp(s(q_i, k_i)/T) / sum_j exp(s(q_i, k_j)/T) )

    i.e. the positive of query ``i`` is key ``i`` and the negatives are all other rows of ``k``.

    Cost: O(M^2 D) time and **O(M^2) memory** for the logits matrix (plus its gradient), so
    ``M`` of a few ten thousand is the practical limit on one GPU.

    Args:
        q: ``[M, D]`` queries (C-MAE: predictor output ``q(p(z_1))``).
        k: ``[M, D]`` keys (C-MAE: projector output ``p(z_2)``, usually from the EMA branch).
        temperature: softmax temperature ``tau`` (> 0).

    Returns:
        0-dim tensor (float32 for half-precision inputs).
    """
    if q.ndim != 2 or q.shape != k.shape:
        raise ValueError(
            f"info_nce: expected q, k of equal shape [M, D], got {tuple(q.shape)}, {tuple(k.shape)}"
        )
    qn = F.normalize(_f32(q), dim=-1)
    kn = F.normalize(_f32(k), dim=-1)
    logits = _f32(qn @ kn.transpose(0, 1)) / temperature
    targets = torch.arange(q.shape[0], device=q.device)
    return F.cross_entropy(logits, targets)


def _row_nce(qn: Tensor, kn: Tensor, pos: Tensor, temperature: float) -> Tensor:
    """Per-row InfoNCE ``logsumexp_j(q_i . k_j / T) - q_i . k_pos(i) / T`` for unit vectors
    qn [c, D], kn [M, D], pos [c] (long) -> [c]; logits [c, M] live only inside this call."""
    logits = _f32(qn @ kn.transpose(0, 1)) / temperature  # [c, M]
    return torch.logsumexp(logits, dim=1) - logits.gather(1, pos.unsqueeze(1)).squeeze(1)


def chunked_info_nce(
    q: Tensor, k: Tensor, pos: Tensor, temperature: float = 0.2, chunk_size: int = 1024
) -> Tensor:
    """Per-query InfoNCE of ``M`` queries against ``K`` keys, computed ``chunk_size`` rows at a
    time: ``loss_i = -log softmax_j(cos(q_i, k_j) / T)[pos_i]`` -> [M] (float32 or wider).

    Memory: the logits of one chunk, ``chunk_size x K``, instead of ``M x K``. In training the
    chunks are activation-checkpointed, so the backward pass recomputes each chunk's logits
    instead of keeping all of them (O(chunk_size K) extra memory in both passes, one more
    matrix product of compute). Equals ``F.cross_entropy(q_n @ k_n.T / T, pos,
    reduction='none')`` (tested).

    Args:
        q: ``[M, D]`` queries.  k: ``[K, D]`` keys.  pos: ``[M]`` index of each query's
            positive key.  temperature: softmax temperature.  chunk_size: rows per chunk.
    """
    if chunk_size < 1:
        raise ValueError(f"chunked_info_nce: chunk_size must be >= 1, got {chunk_size}")
    qn = F.normalize(_f32(q), dim=-1)
    kn = F.normalize(_f32(k), dim=-1)
    grad = torch.is_grad_enabled() and (qn.requires_grad or kn.requires_grad)
    out = []
    for s in range(0, qn.shape[0], chunk_size):
        qc, pc = qn[s : s + chunk_size], pos[s : s + chunk_size]
        if grad and qn.shape[0] > chunk_size:
            out.append(
                torch.utils.checkpoint.checkpoint(
                    _row_nce, qc, kn, pc, temperature, use_reentrant=False
                )
            )
        else:
            out.append(_row_nce(qc, kn, pc, temperature))
    return torch.cat(out) if out else qn.new_zeros(0)


def token_info_nce(
    q: Tensor,
    k: Tensor,
    mask: Optional[Tensor] = None,
    temperature: float = 0.2,
    negatives: str = "image",
    key_mask: Optional[Tensor] = None,
    key_offset: int = 0,
    chunk_size: int = 1024,
    reduction: str = "mean",
) -> Tensor:
    """Token-wise InfoNCE of C-MAE (Kong & Zhang Eq. (9)-(11), the "token-wise" rows of Tab. 3).

    Every selected token ``(b, i)`` is a query ``q[b, i]``; its positive is the key at the same
    position of the same image, ``k[key_offset + b, i]``; similarities are cosine (Eq. (10)).
    The candidate keys (positive and negatives) are the selected keys (``key_mask``) of

    * ``'position'``: the same position ``i`` in every image of the (global) batch -- Eq. (11)
      applied "to each patch token respectively" exactly as it is applied to the class token
      (instance-wise, MoCo v3 style) at each position. Logits ``[N, B, Bk]``, O(N B Bk) memory.
      A token that carries nothing but its position embedding sits exactly at chance (all its
      candidates share that position);
    * ``'image'``: every position of the same image. Logits ``[B, N, N]``, O(B N^2) memory.
      Position alone separates the candidates here (a shortcut: see tests/test_table5.py);
    * ``'batch'``: every selected key of the (global) batch. ``M x K`` logits computed by
      :func:`chunked_info_nce` in chunks of ``chunk_size`` queries, so memory stays
      O(chunk_size K) although the formula is O((B N)^2).

    Per-query losses are averaged over the selected queries ("we gather all loss terms by
    averaging them up").

    Args:
        q: ``[B, N, D]`` queries (online branch, after the predictor).
        k: ``[Bk, N, D]`` keys (target branch, after the projector), ``Bk >= B``: under
            DistributedDataParallel the keys of every process, concatenated; q's own images are
            ``k[key_offset : key_offset + B]``.
        mask: ``[B, N]`` bool, True = the token is a query; ``None`` = all.
        temperature: softmax temperature.
        negatives: ``'position' | 'image' | 'batch'``.
        key_mask: ``[Bk, N]`` bool, True = the key is a candidate; default ``mask`` (when
            ``Bk == B``), i.e. the candidates are the selected tokens.
        key_offset: index of q's first image in ``k``.
        chunk_size: queries per chunk in ``'batch'`` mode.
        reduction: ``'mean'`` (0-dim) or ``'none'`` (``[B, N]``, zero where ``mask`` is False).

    Returns:
        0-dim tensor, or ``[B, N]``. If no token is selected: zero (keeps the graph).
    """
    if q.ndim != 3 or k.ndim != 3 or q.shape[1:] != k.shape[1:] or k.shape[0] < q.shape[0]:
        raise ValueError(
            f"token_info_nce: expected q [B, N, D] and k [Bk >= B, N, D], got "
            f"{tuple(q.shape)}, {tuple(k.shape)}"
        )
    if negatives not in NEGATIVES:
        raise ValueError(
            f"token_info_nce: negatives must be one of {' | '.join(NEGATIVES)}, got {negatives!r}"
        )
    if reduction not in ("mean", "none"):
        raise ValueError(f"token_info_nce: reduction must be 'mean' or 'none', got {reduction!r}")
    B, N, _ = q.shape
    Bk = k.shape[0]
    qm = torch.ones(B, N, dtype=torch.bool, device=q.device) if mask is None else mask != 0
    _check_mask(qm, q.shape[:2], "token_info_nce")
    if key_mask is None:
        if Bk != B:
            raise ValueError("token_info_nce: pass key_mask when k holds more images than q")
        key_mask = qm
    km = key_mask != 0
    _check_mask(km, k.shape[:2], "token_info_nce key_mask")
    qn = F.normalize(_f32(q), dim=-1)
    kn = F.normalize(_f32(k), dim=-1)
    if negatives == "position":
        logits = _f32(torch.bmm(qn.transpose(0, 1), kn.transpose(0, 1).transpose(1, 2)))
        logits = (logits / temperature).masked_fill(~km.t().unsqueeze(1), -1e9)  # [N, B, Bk]
        tgt = (torch.arange(B, device=q.device) + key_offset).repeat(N)  # [N * B]
        per = F.cross_entropy(logits.reshape(N * B, Bk), tgt, reduction="none")
        per = per.view(N, B).t()  # [B, N]
    elif negatives == "image":
        kl, kml = kn[key_offset : key_offset + B], km[key_offset : key_offset + B]
        logits = _f32(torch.bmm(qn, kl.transpose(1, 2))) / temperature  # [B, N, N]
        logits = logits.masked_fill(~kml.unsqueeze(1), -1e9)
        tgt = torch.arange(N, device=q.device).repeat(B)
        per = F.cross_entropy(logits.reshape(B * N, N), tgt, reduction="none").view(B, N)
    else:  # batch: the selected keys of every image, flattened in (image, position) order
        flat_k = km.reshape(-1)
        rank_k = torch.cumsum(flat_k.long(), 0) - 1  # index among selected keys
        own = torch.arange(B * N, device=q.device) + key_offset * N
        sel_q = qm.reshape(-1)
        pos = rank_k[own[sel_q]]
        rows = chunked_info_nce(
            qn.reshape(B * N, -1)[sel_q],
            kn.reshape(Bk * N, -1)[flat_k],
            pos,
            temperature,
            chunk_size,
        )
        base = rows.new_zeros(B * N) + 0.0 * qn.sum()  # keeps the graph if nothing is selected
        per = base.masked_scatter(sel_q, rows).view(B, N)
    per = per.masked_fill(~qm, 0.0)
    if reduction == "none":
        return per
    return masked_mean(per, qm)


def instance_info_nce(
    q: Tensor, k: Tensor, temperature: float = 0.2, key_offset: int = 0, reduction: str = "mean"
) -> Tensor:
    """Instance-wise InfoNCE over the batch (MoCo v3 style; C-MAE's class-token / mean-token loss).

    Same as :func:`info_nce` when ``k`` holds exactly q's images: the positive of image ``b`` is
    ``k[key_offset + b]``, the negatives are the keys of the other images (under
    DistributedDataParallel ``k`` holds the keys of every process, as MoCo v3 gathers them).
    Unlike the MoCo v3 reference code this does **not** multiply by ``2 * temperature``; scale
    it yourself if you need that convention. Memory O(B Bk).

    Args:
        q: ``[B, D]`` queries.
        k: ``[Bk, D]`` keys, ``Bk >= B``.
        temperature: softmax temperature.
        key_offset: index of q's first image in ``k``.
        reduction: ``'mean'`` | ``'none'`` (``[B]``).

    Returns:
        0-dim tensor or ``[B]``.
    """
    if q.ndim != 2 or k.ndim != 2 or q.shape[1] != k.shape[1] or k.shape[0] < q.shape[0]:
        raise ValueError(
            f"instance_info_nce: expected q [B, D], k [Bk >= B, D], got "
            f"{tuple(q.shape)}, {tuple(k.shape)}"
        )
    qn = F.normalize(_f32(q), dim=-1)
    kn = F.normalize(_f32(k), dim=-1)
    logits = _f32(qn @ kn.transpose(0, 1)) / temperature  # [B, Bk]
    tgt = torch.arange(q.shape[0], device=q.device) + key_offset
    return F.cross_entropy(logits, tgt, reduction=reduction)


def byol_loss(
    p: Tensor, z: Tensor, mask: Optional[Tensor] = None, reduction: str = "mean"
) -> Tensor:
    """BYOL regression loss ``2 - 2 cos(p, z)`` (Grill et al., 2020, Eq. (2)), averaged.

    Equal to ``|| p/|p| - z/|z| ||^2``; range [0, 4].

    Args:
        p: ``[..., D]`` online predictions (e.g. ``[B, D]`` or ``[B, N, D]``).
        z: same shape, targets (not detached here).
        mask: optional ``p.shape[:-1]`` mask, 1 = counts (see :func:`masked_mean`).
        reduction: ``'mean'`` or ``'none'`` (per-token values ``p.shape[:-1]``, zero where
            ``mask`` is 0).

    Returns:
        0-dim tensor (or ``p.shape[:-1]``).
    """
    if p.shape != z.shape:
        raise ValueError(f"byol_loss: p {tuple(p.shape)} vs z {tuple(z.shape)}")
    pn = F.normalize(_f32(p), dim=-1)
    zn = F.normalize(_f32(z), dim=-1)
    per = 2.0 - 2.0 * (pn * zn).sum(dim=-1)
    if reduction == "none":
        return per if mask is None else per.masked_fill(mask == 0, 0.0)
    return masked_mean(per, mask)


# --------------------------------------------------------------------------------------
# Target normalisations
# --------------------------------------------------------------------------------------
def layernorm_target(t: Tensor, eps: float = 1e-6) -> Tensor:
    """Layer norm without affine parameters over the last dim (MaskDistill's target normaliser).

    ``(t - mean_C t) / sqrt(var_C t + eps)`` with the biased variance, per token.

    Args:
        t: ``[B, N, C]`` (any ``[..., C]``) teacher features.
        eps: variance epsilon.

    Returns:
        Tensor of the same shape (float32 for half-precision input).
    """
    t = _f32(t)
    return F.layer_norm(t, t.shape[-1:], eps=eps)


def patch_norm_target(t: Tensor, eps: float = 1e-6, unbiased: bool = True) -> Tensor:
    """Per-token (per-patch) normalisation of pixel targets: MAE's ``norm_pix_loss``, the one
    implementation (MAE, R-MAE, reconstructions).

    ``(t - mean) / sqrt(var + eps)`` with mean / variance over the last dim of each token.
    ``unbiased=True`` (default) is the official MAE code's ``target.var(dim=-1)`` (Bessel's
    correction), bit for bit; ``unbiased=False`` the population variance.

    Args:
        t: ``[B, N, C]`` patchified pixels (``C = p * p * 3``), any ``[..., C]``.
        eps: variance epsilon.
        unbiased: Bessel's correction in the variance.

    Returns:
        Tensor of the same shape (float32 for half-precision input).
    """
    t = _f32(t)
    mean = t.mean(dim=-1, keepdim=True)
    var = t.var(dim=-1, unbiased=unbiased, keepdim=True)
    return (t - mean) / (var + eps) ** 0.5


def instance_norm_tokens(t: Tensor, eps: float = 1e-5) -> Tensor:
    """Normalise every channel over the token axis, per image (data2vec target normalisation).

    ``F.instance_norm(t.transpose(1, 2)).transpose(1, 2)``: for each ``(b, c)``,
    ``(t[b, :, c] - mean_N) / sqrt(var_N + eps)`` (biased variance, no affine).

    Args:
        t: ``[B, N, C]`` with ``N > 1``.
        eps: variance epsilon (``F.instance_norm`` default).

    Returns:
        ``[B, N, C]`` tensor.
    """
    if t.ndim != 3:
        raise ValueError(f"instance_norm_tokens: expected [B, N, C], got {tuple(t.shape)}")
    t = _f32(t)
    return F.instance_norm(t.transpose(1, 2), eps=eps).transpose(1, 2)
