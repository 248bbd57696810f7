"""Representation similarity (linear CKA) and reconstruction quality (PSNR).

* :func:`linear_cka` -- linear Centered Kernel Alignment of Kornblith et al. (2019), used in
  Fig. 1 of Kong & Zhang (2022) to compare features of full and masked images block by block.
* :class:`CKAAccumulator` -- the same number computed over mini-batches with bounded memory.
* :func:`psnr`, :func:`psnr_from_mse` -- peak signal-to-noise ratio in dB (Tab. 1 of Kong &
  Zhang reports the PSNR of reconstructions).

All CKA arithmetic is done in float64 and without autograd.
"""

from __future__ import annotations

from typing import Dict, Hashable, Optional, Union

import torch
from torch import Tensor

__all__ = ["to_2d", "linear_cka", "CKAAccumulator", "psnr", "psnr_from_mse", "CKA_REDUCTIONS"]

CKA_REDUCTIONS = ("mean_tokens", "flatten")


def to_2d(t: Tensor, reduce: str = "mean_tokens") -> Tensor:
    """Bring features to the ``[n, d]`` layout CKA needs (examples x features).

    Args:
        t: ``[B, D]`` (returned unchanged) or ``[B, T, D]`` (any ``[B, ..., D]``).
        reduce: ``'mean_tokens'`` averages over all axes between the first and the last ->
            ``[B, D]`` (works when the two representations have different token counts, e.g.
            MAE encoder features of masked vs. full images); ``'flatten'`` reshapes to
            ``[B, T * D]`` (token counts and order must be meaningful; memory grows as (T D)^2
            in :class:`CKAAccumulator`).

    Returns:
        ``[B, d]`` tensor (a view or a new tensor; the input is not modified).
    """
    if reduce not in CKA_REDUCTIONS:
        raise ValueError(f"reduce must be one of {CKA_REDUCTIONS}, got {reduce!r}")
    if t.ndim < 2:
        raise ValueError(f"expected features [n, d] or [n, T, d], got shape {tuple(t.shape)}")
    if t.ndim == 2:
        return t
    if reduce == "mean_tokens":
        return t.flatten(1, -2).mean(dim=1)
    return t.reshape(t.shape[0], -1)


def _centre(x: Tensor) -> Tensor:
    return x - x.mean(dim=0, keepdim=True)


@torch.no_grad()
def linear_cka(x: Tensor, y: Tensor) -> Tensor:
    """Linear CKA between two representations of the same ``n`` examples (Kornblith et al. 2019).

    With column-centred ``X`` (``[n, d1]``) and ``Y`` (``[n, d2]``)::

        CKA(X, Y) = ||Y^T X||_F^2 / (||X^T X||_F * ||Y^T Y||_F)

    (Eq. (4) of Kornblith et al.). It lies in [0, 1], is 1 for identical representations and is
    invariant to isotropic scaling and orthogonal transforms of either side (not to arbitrary
    invertible linear maps). Computed in float64 without autograd; when ``n < max(d1, d2)``
    the equivalent Gram form ``<K, L>_F / (||K||_F ||L||_F)`` with ``K = X X^T``,
    ``L = Y Y^T`` is used, so memory is ``O(min(n^2, d1^2 + d2^2 + d1 d2))``.

    Args:
        x: ``[n, d1]`` features.
        y: ``[n, d2]`` features of the same examples in the same order.

    Returns:
        0-dim float64 tensor; NaN if either representation is constant over the examples.
    """
    if x.ndim != 2 or y.ndim != 2:
        raise ValueError(
            f"linear_cka expects [n, d] inputs (see to_2d), got {tuple(x.shape)}, {tuple(y.shape)}"
        )
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"linear_cka: different numbers of examples {x.shape[0]} vs {y.shape[0]}")
    x = _centre(x.detach().to(torch.float64))
    y = _centre(y.detach().to(device=x.device, dtype=torch.float64))
    n, d1, d2 = x.shape[0], x.shape[1], y.shape[1]
    if n < max(d1, d2):
        k = x @ x.T
        l = y @ y.T
        return (k * l).sum() / (torch.linalg.norm(k) * torch.linalg.norm(l))
    hsic = torch.linalg.norm(y.T @ x) ** 2
    return hsic / (torch.linalg.norm(x.T @ x) * torch.linalg.norm(y.T @ y))


class _Moments:
    """Running mean and centred (co-)moment matrices of one feature pair, float64."""

    __slots__ = ("n", "mx", "my", "cxx", "cyy", "cyx")

    def __init__(self, x: Tensor, y: Tensor):
        self.n = x.shape[0]
        self.mx = x.mean(dim=0)
        self.my = y.mean(dim=0)
        xc, yc = x - self.mx, y - self.my
        self.cxx = xc.T @ xc
        self.cyy = yc.T @ yc
        self.cyx = yc.T @ xc

    def merge(self, other: "_Moments") -> None:
        """Chan et al. pairwise update: exact co-moments of the union of both sets."""
        na, nb = self.n, other.n
        n = na + nb
        dx = other.mx - self.mx
        dy = other.my - self.my
        f = na * nb / n
        self.cxx += other.cxx + f * torch.outer(dx, dx)
        self.cyy += other.cyy + f * torch.outer(dy, dy)
        self.cyx += other.cyx + f * torch.outer(dy, dx)
        self.mx += dx * (nb / n)
        self.my += dy * (nb / n)
        self.n = n

    def cka(self) -> Tensor:
        return torch.linalg.norm(self.cyx) ** 2 / (
            torch.linalg.norm(self.cxx) * torch.linalg.norm(self.cyy)
        )


class CKAAccumulator:
    """Exact linear CKA over a data set fed in mini-batches, for one or many feature pairs.

    For each key it keeps, in float64, the number of examples ``n``, the means of ``x`` and
    ``y`` and the centred moment matrices ``X_c^T X_c`` (``[d1, d1]``), ``Y_c^T Y_c``
    (``[d2, d2]``) and ``Y_c^T X_c`` (``[d2, d1]``) -- the Gram-free sufficient statistics of
    linear CKA. Batches are merged with the pairwise update of Chan et al. (analytic centring:
    equivalent to accumulating ``sum x``, ``sum y``, ``X^T X``, ``Y^T Y``, ``Y^T X`` and
    subtracting ``sum x sum x^T / n`` at the end, but free of catastrophic cancellation when
    features have large means). :meth:`value` therefore equals :func:`linear_cka` on the
    concatenation of all batches (up to float64 round-off), whatever the batch split.

    Memory per key: ``O(d1^2 + d2^2 + d1 d2)`` float64 numbers, independent of the number of
    examples (ViT-B, ``d = 768``: ~14 MB per key). With ``reduce='flatten'`` on ``[B, T, D]``
    inputs ``d = T * D``, which is only practical for small ``T * D``.

    Example (Fig. 1 of Kong & Zhang: block-wise CKA between full and masked inputs)::

        acc = CKAAccumulator()
        for images in loader:
            for i, (f_full, f_masked) in enumerate(zip(feats(images), feats(masked(images)))):
                acc.update(i, f_full, f_masked)      # [B, T1, D], [B, T2, D]
        acc.values()                                 # {0: tensor(0.97), 1: ...}

    Args:
        reduce: how ``[B, T, D]`` inputs become ``[B, d]``: ``'mean_tokens'`` (default) or
            ``'flatten'`` (see :func:`to_2d`).
        device: where the statistics live; default: the device of the first ``x`` per key.
    """

    def __init__(
        self, reduce: str = "mean_tokens", device: Optional[Union[str, torch.device]] = None
    ):
        if reduce not in CKA_REDUCTIONS:
            raise ValueError(f"reduce must be one of {CKA_REDUCTIONS}, got {reduce!r}")
        self.reduce = reduce
        self.device = torch.device(device) if device is not None else None
        self._stats: Dict[Hashable, _Moments] = {}

    @torch.no_grad()
    def update(self, key: Hashable, x: Tensor, y: Tensor) -> None:
        """Add one mini-batch of paired features for ``key``.

        Args:
            key: any hashable (e.g. the block index).
            x: ``[B, d1]`` or ``[B, T1, d1]``.
            y: ``[B, d2]`` or ``[B, T2, d2]``, same ``B`` and example order as ``x``.
        """
        x2, y2 = to_2d(x.detach(), self.reduce), to_2d(y.detach(), self.reduce)
        if x2.shape[0] != y2.shape[0]:
            raise ValueError(
                f"CKAAccumulator.update: batch sizes differ: {x2.shape[0]} vs {y2.shape[0]}"
            )
        if x2.shape[0] == 0:
            return
        prev = self._stats.get(key)
        dev = self.device or (prev.mx.device if prev is not None else x2.device)
        batch = _Moments(x2.to(dev, torch.float64), y2.to(dev, torch.float64))
        if prev is None:
            self._stats[key] = batch
            return
        if prev.mx.shape != batch.mx.shape or prev.my.shape != batch.my.shape:
            raise ValueError(
                f"CKAAccumulator.update: feature dims for key {key!r} changed from "
                f"({prev.mx.shape[0]}, {prev.my.shape[0]}) to "
                f"({batch.mx.shape[0]}, {batch.my.shape[0]})"
            )
        prev.merge(batch)

    def value(self, key: Hashable = None) -> Tensor:
        """Linear CKA for ``key`` (may be omitted when exactly one key exists); 0-dim float64."""
        if key is None and len(self._stats) == 1:
            key = next(iter(self._stats))
        if key not in self._stats:
            raise KeyError(f"CKAAccumulator: no data for key {key!r} (keys: {list(self._stats)})")
        return self._stats[key].cka()

    def values(self) -> Dict[Hashable, Tensor]:
        """``{key: linear CKA}`` for every key, in insertion order."""
        return {k: s.cka() for k, s in self._stats.items()}

    def count(self, key: Hashable = None) -> int:
        """Number of examples accumulated for ``key``."""
        if key is None and len(self._stats) == 1:
            key = next(iter(self._stats))
        return self._stats[key].n if key in self._stats else 0

    def keys(self):
        return self._stats.keys()

    def reset(self) -> None:
        """Drop all statistics."""
        self._stats.clear()

    def __len__(self) -> int:
        return len(self._stats)


# --------------------------------------------------------------------------------------
# PSNR
# --------------------------------------------------------------------------------------
def psnr_from_mse(mse: Union[Tensor, float], data_range: float = 1.0) -> Tensor:
    """``10 * log10(data_range^2 / mse)`` in dB, float64; ``mse == 0`` gives ``+inf``.

    Args:
        mse: mean squared error(s), any shape, tensor or Python number.
        data_range: peak-to-peak range of the signal (1.0 for [0, 1] images, 255 for uint8).

    Returns:
        float64 tensor of the shape of ``mse``.
    """
    if isinstance(mse, Tensor):
        mse = mse.detach().to(torch.float64)
    else:  # straight to float64: a float32 detour would cost ~1e-7 dB
        mse = torch.as_tensor(mse, dtype=torch.float64)
    return 10.0 * torch.log10((float(data_range) ** 2) / mse)


@torch.no_grad()
def psnr(a: Tensor, b: Tensor, data_range: float = 1.0, reduction: str = "mean") -> Tensor:
    """Peak signal-to-noise ratio per image, in dB.

    ``PSNR_b = 10 log10(data_range^2 / MSE_b)`` with ``MSE_b`` the mean of ``(a - b)^2`` over
    all non-batch axes, computed in float64.

    Args:
        a, b: ``[B, C, H, W]`` images (any ``[B, ...]``, e.g. patchified ``[B, N, P]``) of the
            same shape; the first axis is the batch.
        data_range: peak-to-peak range (1.0 for [0, 1] images, 255 for uint8).
        reduction: ``'none'`` -> ``[B]`` per-image values (``+inf`` where the images are
            identical); ``'mean'`` -> 0-dim mean over the images with finite PSNR. Identical
            images (``+inf``) are left out of the mean; the result is ``+inf`` only if *all*
            images are identical. NaN inputs give NaN.

    Returns:
        float64 tensor, ``[B]`` or 0-dim.
    """
    if a.shape != b.shape:
        raise ValueError(f"psnr: shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}")
    if a.ndim < 2 or a.shape[0] == 0:
        raise ValueError(f"psnr: expected a non-empty batch [B, ...], got {tuple(a.shape)}")
    if reduction not in ("mean", "none"):
        raise ValueError(f"psnr: reduction must be 'mean' or 'none', got {reduction!r}")
    diff = a.detach().to(torch.float64) - b.detach().to(device=a.device, dtype=torch.float64)
    mse = diff.pow(2).flatten(1).mean(dim=1)
    per_image = psnr_from_mse(mse, data_range)
    if reduction == "none":
        return per_image
    keep = per_image != float("inf")
    cnt = keep.sum()
    total = torch.where(keep, per_image, torch.zeros_like(per_image)).sum()
    return torch.where(cnt > 0, total / cnt.clamp_min(1), torch.full_like(total, float("inf")))
