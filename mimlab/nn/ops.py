"""Small pure tensor functions: patchify, masking, gathers, sin-cos position embeddings.

Notation: B batch, C channels, H/W image size, p patch size, N = (H/p)*(W/p) patches,
K visible patches, D token width. Masks are float or bool tensors of shape [B, N] with
**1 = removed (masked)**, 0 = visible, as in MAE (Eq. 2 of Kong & Zhang writes M for the kept
part; our ``mask`` is their ``1 - M``).
"""

from __future__ import annotations

import math
from typing import Optional

import numpy as np
import torch


# ---------------------------------------------------------------------------- patches
def patchify(imgs: torch.Tensor, p: int) -> torch.Tensor:
    """[B, C, H, W] -> [B, N, p*p*C], patch order row-major, values ordered (py, px, c)."""
    B, C, H, W = imgs.shape
    if H % p or W % p:
        raise ValueError(f"image size {H}x{W} is not divisible by patch size {p}")
    h, w = H // p, W // p
    x = imgs.reshape(B, C, h, p, w, p)
    x = torch.einsum("bchpwq->bhwpqc", x)
    return x.reshape(B, h * w, p * p * C)


def unpatchify(x: torch.Tensor, p: int, grid: tuple[int, int], channels: int) -> torch.Tensor:
    """Inverse of :func:`patchify`: [B, N, p*p*C] -> [B, C, h*p, w*p]."""
    B, N, L = x.shape
    h, w = grid
    if N != h * w or L != p * p * channels:
        raise ValueError(f"cannot unpatchify {tuple(x.shape)} to grid {grid}, p={p}, C={channels}")
    x = x.reshape(B, h, w, p, p, channels)
    x = torch.einsum("bhwpqc->bchpwq", x)
    return x.reshape(B, channels, h * p, w * p)


# ---------------------------------------------------------------------------- masking
def num_visible(num_patches: int, mask_ratio: float) -> int:
    """Number of kept patches K = int(N * (1 - ratio)) (MAE's rounding), at least 1."""
    if not 0.0 <= mask_ratio < 1.0:
        raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
    return max(1, int(num_patches * (1 - mask_ratio)))


def random_masking(
    noise: torch.Tensor, mask_ratio: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-sample random masking by argsort of noise (MAE).

    noise: [B, N] any real values (uniform in MAE); the K patches with the *smallest* noise stay.
    Returns ``ids_keep`` [B, K] (long), ``mask`` [B, N] (float, 1 = removed),
    ``ids_restore`` [B, N] such that gathering ``cat(kept, removed)`` with ids_restore restores
    the original order. Same noise => same mask.
    """
    B, N = noise.shape
    K = num_visible(N, mask_ratio)
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    ids_keep = ids_shuffle[:, :K]
    mask = torch.ones(B, N, device=noise.device)
    mask[:, :K] = 0
    mask = torch.gather(mask, 1, ids_restore)
    return ids_keep, mask, ids_restore


def mask_to_ids(
    mask: torch.Tensor, keep: Optional[int] = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Boolean/float mask [B, N] with the same number of visible tokens per row ->
    (ids_keep [B, K], ids_restore [B, N]) compatible with :func:`random_masking`.

    ``keep``: K when the caller knows it (:func:`visible_count`): then nothing is read from
    the device (no host sync, no graph break under ``torch.compile``) and the rows are trusted
    to keep exactly K patches. Without it K is read from the mask and every row is checked."""
    m = mask.float()
    if keep is None:
        vis = (1 - m).sum(1)
        if not torch.all(vis == vis[0]):
            raise ValueError("every sample must keep the same number of patches to drop tokens")
        keep = int(vis[0].item())
    # stable sort: visible (0) first in original order, then removed
    ids_shuffle = torch.argsort(m + torch.linspace(0, 0.5, m.shape[1], device=m.device), dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    return ids_shuffle[:, :keep], ids_restore


def visible_count(kind: str, num_patches: int, mask_ratio: float) -> int:
    """Patches every row of a :func:`sample_mask` mask of ``kind`` keeps (a Python int, known
    before any mask is drawn): ``random`` :func:`num_visible`; ``block`` ``N - round(ratio N)``;
    ``none`` N."""
    if kind == "random":
        return num_visible(num_patches, mask_ratio)
    if kind == "block":
        return num_patches - int(round(mask_ratio * num_patches))
    if kind == "none":
        return num_patches
    raise ValueError(f"unknown masking '{kind}' (random | block | none)")


def gather_tokens(x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """x [B, N, D], ids [B, K] -> x[b, ids[b]] as [B, K, D]."""
    return torch.gather(x, 1, ids.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


#: candidate rectangles per sample of :func:`block_masking`. The per-sample loop it replaced
#: allowed 100 tries and stopped at the count; over 2,000 samples at 14 x 14 it never needed
#: more than 32 (at 60 %, 13 % of the samples needed more than 16; at 40 %, none).
BLOCK_TRIES = 32


def block_masking(
    batch: int,
    grid: tuple[int, int],
    mask_ratio: float,
    generator: Optional[torch.Generator] = None,
    min_block: int = 4,
    max_aspect: float = 3.0,
    device=None,
    tries: int = BLOCK_TRIES,
    exact: bool = True,
) -> torch.Tensor:
    """BEiT-style block-wise masking (Bao et al. 2022, Alg. 1), every sample at once.

    Each sample tries ``tries`` rectangles in turn: area ``s ~ U(min_block, max(min_block,
    remaining))`` (``remaining`` = patches still to mask), aspect ratio ``r ~ logU(1 /
    max_aspect, max_aspect)``, sides ``round(sqrt(s r)) x round(sqrt(s / r))``, position
    uniform on the grid; a rectangle that does not fit, or comes after the sample reached its
    count, is skipped. The union is then trimmed (or topped up) at random to exactly
    ``round(ratio * N)`` patches per sample.

    Returns mask [B, N] float (1 = masked), on ``device``. The draws are two calls on
    ``generator`` (the device's default generator when None): ``[B, tries, 4]`` uniforms for
    the rectangles and ``[B, N]`` for the trim order. A Python loop over the ``tries``
    rectangles runs batch-wide tensor ops; nothing is read back to the host, so it runs on the
    device without a sync. Same distribution as the per-sample loop it replaced (which drew
    scalar tensors one try at a time), not the same masks for a seed. ``exact=False`` returns
    the union of the rectangles, before the trim (for tests of the rectangles).
    """
    h, w = grid
    N = h * w
    target = int(round(mask_ratio * N))
    u = torch.rand(batch, tries, 4, generator=generator, device=device)  # [B, T, 4]
    dev = u.device
    log_max = math.log(max_aspect)
    sqrt_ar = torch.exp((2.0 * u[..., 1] - 1.0) * log_max).sqrt()  # [B, T]: sqrt(aspect)
    rows = torch.arange(h, device=dev).view(1, h)
    cols = torch.arange(w, device=dev).view(1, w)
    m = torch.zeros(batch, h, w, dtype=torch.bool, device=dev)  # [B, h, w]
    count = torch.zeros(batch, device=dev)  # [B] masked patches so far
    for t in range(tries):
        hi = (target - count).clamp_min(min_block)  # [B] upper bound of the area
        root = (min_block + u[:, t, 0] * (hi - min_block)).sqrt()  # [B] sqrt(area)
        bh, bw = torch.round(root * sqrt_ar[:, t]), torch.round(root / sqrt_ar[:, t])  # [B]
        ok = (bh >= 1) & (bw >= 1) & (bh <= h) & (bw <= w) & (count < target)  # [B]
        top = torch.floor(u[:, t, 2] * (h - bh + 1)).unsqueeze(1)  # [B, 1]
        left = torch.floor(u[:, t, 3] * (w - bw + 1)).unsqueeze(1)
        in_rows = (rows >= top) & (rows < top + bh.unsqueeze(1)) & ok.unsqueeze(1)  # [B, h]
        in_cols = (cols >= left) & (cols < left + bw.unsqueeze(1))  # [B, w]
        m = m | (in_rows.unsqueeze(2) & in_cols.unsqueeze(1))  # [B, h, w]
        count = m.sum((1, 2)).float()
    if not exact:
        return m.reshape(batch, N).float()
    # exactly `target` per sample: the painted patches first, random order within each group
    prio = m.reshape(batch, N).float() + torch.rand(batch, N, generator=generator, device=dev)
    top_k = torch.topk(prio, target, dim=1).indices  # [B, target]
    return torch.zeros(batch, N, device=dev).scatter_(1, top_k, 1.0)


# ---------------------------------------------------------------------------- positions


def sample_mask(
    kind: str,
    batch: int,
    grid: tuple[int, int],
    mask_ratio: float,
    device=None,
    noise: Optional[torch.Tensor] = None,
    generator: Optional[torch.Generator] = None,
) -> Optional[torch.Tensor]:
    """The patch mask of every method's T1 (and R-MAE's independent T2): [B, N] float,
    1 = removed. ``kind``: ``random`` (MAE's :func:`random_masking`, from ``noise`` [B, N] when
    given), ``block`` (:func:`block_masking`) or ``none`` (returns None: nothing removed).
    Random draws come from ``generator`` (default: the device's default generator)."""
    if kind == "none":
        return None
    if kind == "random":
        if noise is None:
            noise = torch.rand(batch, grid[0] * grid[1], device=device, generator=generator)
        return random_masking(noise, mask_ratio)[1]
    if kind == "block":
        return block_masking(batch, grid, mask_ratio, generator, device=device)
    raise ValueError(f"unknown masking '{kind}' (random | block | none)")


def sincos_pos_embed_2d(dim: int, grid: tuple[int, int], cls_token: bool = False) -> np.ndarray:
    """Fixed 2-D sin-cos position embedding (MAE / MoCo v3).

    Returns float32 array [(1 if cls_token) + h*w, dim]; half the channels encode the row,
    half the column; the class-token row is zeros.
    """
    if dim % 4:
        raise ValueError(f"sin-cos position embedding needs dim divisible by 4, got {dim}")
    h, w = grid
    gy, gx = np.meshgrid(
        np.arange(h, dtype=np.float64), np.arange(w, dtype=np.float64), indexing="ij"
    )

    def enc_1d(d: int, pos: np.ndarray) -> np.ndarray:
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    # MAE convention: first half encodes the column (w), second half the row (h)
    emb = np.concatenate([enc_1d(dim // 2, gx), enc_1d(dim // 2, gy)], axis=1)
    if cls_token:
        emb = np.concatenate([np.zeros([1, dim]), emb], axis=0)
    return emb.astype(np.float32)
