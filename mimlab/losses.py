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
  applied token-wise -> :func:`info_nce`, :func:`token_info_nce`, :func:`instance_info_nce`.
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
from torch import Tensor

__all__ = [
    "masked_mean",
    "regression_loss",
    "info_nce",
    "token_info_nce",
    "instance_info_nce",
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
        raise ValueError(f"regression_loss: pred {tuple(pred.shape)} vs target {tuple(target.shape)}")
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
        raise ValueError(f"regression_loss: unknown kind {kind!r}, expected one of {REGRESSION_KINDS}")
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
        raise ValueError(f"info_nce: expected q, k of equal shape [M, D], got {tuple(q.shape)}, {tuple(k.shape)}")
    qn = F.normalize(_f32(q), dim=-1)
    kn = F.normalize(_f32(k), dim=-1)
    logits = _f32(qn @ kn.transpose(0, 1)) / temperature
    targets = torch.arange(q.shape[0], device=q.device)
    return F.cross_entropy(logits, targets)


def token_info_nce(
    q: Tensor,
    k: Tensor,
    mask: Optional[Tensor] = None,
    temperature: float = 0.2,
    negatives: str = "image",
) -> Tensor:
    """Token-wise InfoNCE of C-MAE (Kong & Zhang Eq. (9)-(11), the "token-wise" variant of Tab. 3).

    For every selected token ``(b, i)`` the query is ``q[b, i]`` and its positive is the token at
    the same position of the other branch, ``k[b, i]``. Similarities are cosine (Eq. (10)).
    Per-token losses are averaged ("we gather all loss terms by averaging them up").

    * ``negatives='image'``: the negatives of ``(b, i)`` are the other tokens of the same image,
      ``k[b, j], j != i`` (all ``N`` tokens of that image are keys, masked or not). Logits are
      ``[B, N, N]``: O(B N^2 D) time, **O(B N^2) memory**.
    * ``negatives='batch'``: the ``M = mask.sum()`` selected tokens of the whole batch are
      flattened and :func:`info_nce` is applied: the negatives are all other *selected* tokens of
      all images. Logits are ``[M, M]`` with ``M <= B N``: **O((B N)^2) memory** in the worst
      case (no mask), which grows quickly (B=256, N=196 -> 2.5e9 logits).

    Args:
        q: ``[B, N, D]`` queries (online branch, after the predictor).
        k: ``[B, N, D]`` keys (other branch, after the projector).
        mask: ``[B, N]`` binary, 1 = token is a query (e.g. the masked patches); ``None`` = all.
            With ``'image'`` a float mask acts as per-query weights.
        temperature: softmax temperature.
        negatives: ``'image' | 'batch'``.

    Returns:
        0-dim tensor. If no token is selected: ``0 * (q.sum() + k.sum())`` (zero, keeps graph).
    """
    if q.ndim != 3 or q.shape != k.shape:
        raise ValueError(
            f"token_info_nce: expected q, k of equal shape [B, N, D], got {tuple(q.shape)}, {tuple(k.shape)}"
        )
    if mask is not None:
        _check_mask(mask, q.shape[:2], "token_info_nce")
    B, N, _ = q.shape
    if negatives == "image":
        qn = F.normalize(_f32(q), dim=-1)
        kn = F.normalize(_f32(k), dim=-1)
        logits = _f32(torch.bmm(qn, kn.transpose(1, 2))) / temperature  # [B, N, N]
        targets = torch.arange(N, device=q.device).repeat(B)
        per_token = F.cross_entropy(logits.reshape(B * N, N), targets, reduction="none").view(B, N)
        return masked_mean(per_token, mask)
    if negatives == "batch":
        qf, kf = q.reshape(B * N, -1), k.reshape(B * N, -1)
        if mask is not None:
            sel = mask.reshape(B * N) != 0
            qf, kf = qf[sel], kf[sel]
        if qf.shape[0] == 0:
            return _f32(q.sum() + k.sum()) * 0.0
        return info_nce(qf, kf, temperature)
    raise ValueError(f"token_info_nce: negatives must be 'image' or 'batch', got {negatives!r}")


def instance_info_nce(q: Tensor, k: Tensor, temperature: float = 0.2) -> Tensor:
    """Instance-wise InfoNCE over the batch (MoCo v3 style; C-MAE's class-token / mean-token loss).

    Same as :func:`info_nce` with ``M = B``: the positive of image ``b`` is ``k[b]``, the
    negatives are the keys of the other images. Unlike the MoCo v3 reference code this does
    **not** multiply by ``2 * temperature``; scale it yourself if you need that convention.
    Memory O(B^2).

    Args:
        q: ``[B, D]`` queries.  k: ``[B, D]`` keys.  temperature: softmax temperature.

    Returns:
        0-dim tensor.
    """
    return info_nce(q, k, temperature)


def byol_loss(p: Tensor, z: Tensor, mask: Optional[Tensor] = None) -> Tensor:
    """BYOL regression loss ``2 - 2 cos(p, z)`` (Grill et al., 2020, Eq. (2)), averaged.

    Equal to ``|| p/|p| - z/|z| ||^2``; range [0, 4].

    Args:
        p: ``[..., D]`` online predictions (e.g. ``[B, D]`` or ``[B, N, D]``).
        z: same shape, targets (not detached here).
        mask: optional ``p.shape[:-1]`` mask, 1 = counts (see :func:`masked_mean`).

    Returns:
        0-dim tensor.
    """
    if p.shape != z.shape:
        raise ValueError(f"byol_loss: p {tuple(p.shape)} vs z {tuple(z.shape)}")
    pn = F.normalize(_f32(p), dim=-1)
    zn = F.normalize(_f32(z), dim=-1)
    per = 2.0 - 2.0 * (pn * zn).sum(dim=-1)
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


def patch_norm_target(t: Tensor, eps: float = 1e-6, unbiased: bool = False) -> Tensor:
    """Per-token (per-patch) normalisation of pixel targets: MAE's ``norm_pix_loss``.

    ``(t - mean) / sqrt(var + eps)`` with mean / variance over the last dim of each token.
    ``unbiased=False`` (default) uses the population variance; the official MAE code calls
    ``target.var(dim=-1)`` which is the unbiased estimate: pass ``unbiased=True`` to reproduce
    it exactly.

    Args:
        t: ``[B, N, C]`` patchified pixels (``C = p * p * 3``), any ``[..., C]``.
        eps: variance epsilon.
        unbiased: Bessel's correction in the variance.

    Returns:
        Tensor of the same shape.
    """
    t = _f32(t)
    mean = t.mean(dim=-1, keepdim=True)
    var = t.var(dim=-1, unbiased=unbiased, keepdim=True)
    return (t - mean) / (var + eps).sqrt()


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
