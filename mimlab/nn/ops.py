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


def mask_to_ids(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Boolean/float mask [B, N] with the same number of visible tokens per row ->
    (ids_keep [B, K], ids_restore [B, N]) compatible with :func:`random_masking`."""
    m = mask.float()
    vis = (1 - m).sum(1)
    if not torch.all(vis == vis[0]):
        raise ValueError("every sample must keep the same number of patches to drop tokens")
    # stable sort: visible (0) first in original order, then removed
    ids_shuffle = torch.argsort(m + torch.linspace(0, 0.5, m.shape[1], device=m.device), dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    return ids_shuffle[:, : int(vis[0].item())], ids_restore


def gather_tokens(x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """x [B, N, D], ids [B, K] -> x[b, ids[b]] as [B, K, D]."""
    return torch.gather(x, 1, ids.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def block_masking(
    batch: int,
    grid: tuple[int, int],
    mask_ratio: float,
    generator: Optional[torch.Generator] = None,
    min_block: int = 4,
    max_aspect: float = 3.0,
    device=None,
) -> torch.Tensor:
    """BEiT-style block-wise masking: rectangles are added until ``round(ratio*N)`` patches
    are masked (then topped up / trimmed at random so every sample has exactly that count).

    Returns mask [B, N] float (1 = masked). Used by MaskDistill / SimMIM presets.

    The random draws (``generator``, else the global torch RNG) are the same calls in the same
    order as in the original per-sample tensor loop, so a seed gives the same masks bitwise;
    the per-try bookkeeping (painting, counting) runs on a NumPy grid instead of scalar tensor
    ops (which dominated the cost), and the batch reaches ``device`` in one copy.
    """
    h, w = grid
    N = h * w
    target = int(round(mask_ratio * N))
    out = np.zeros((batch, N), dtype=np.float32)
    g = generator
    log_max = math.log(max_aspect)
    for b in range(batch):
        m = np.zeros((h, w), dtype=bool)
        count, tries = 0, 0
        while count < target and tries < 100:
            tries += 1
            remaining = target - count
            area = torch.empty(1).uniform_(min_block, max(min_block, remaining), generator=g)
            log_r = torch.empty(1).uniform_(-log_max, log_max, generator=g)
            area_f, ar = area.item(), math.exp(log_r.item())
            bh = int(round(math.sqrt(area_f * ar)))
            bw = int(round(math.sqrt(area_f / ar)))
            if bh < 1 or bw < 1 or bh > h or bw > w:
                continue
            top = torch.randint(0, h - bh + 1, (1,), generator=g).item()
            left = torch.randint(0, w - bw + 1, (1,), generator=g).item()
            m[top : top + bh, left : left + bw] = True
            count = int(m.sum())
        flat = m.reshape(-1)
        if count > target:  # trim at random
            on = np.flatnonzero(flat)
            flat[on[torch.randperm(len(on), generator=g)[: count - target].numpy()]] = False
        elif count < target:  # top up at random
            off = np.flatnonzero(~flat)
            flat[off[torch.randperm(len(off), generator=g)[: target - count].numpy()]] = True
        out[b] = flat
    t = torch.from_numpy(out)
    return t.to(device) if device is not None else t


# ---------------------------------------------------------------------------- positions


def sample_mask(
    kind: str,
    batch: int,
    grid: tuple[int, int],
    mask_ratio: float,
    device=None,
    noise: Optional[torch.Tensor] = None,
) -> Optional[torch.Tensor]:
    """The patch mask of every method's T1 (and R-MAE's independent T2): [B, N] float,
    1 = removed. ``kind``: ``random`` (MAE's :func:`random_masking`, from ``noise`` [B, N] when
    given), ``block`` (:func:`block_masking`) or ``none`` (returns None: nothing removed)."""
    if kind == "none":
        return None
    if kind == "random":
        if noise is None:
            noise = torch.rand(batch, grid[0] * grid[1], device=device)
        return random_masking(noise, mask_ratio)[1]
    if kind == "block":
        return block_masking(batch, grid, mask_ratio, device=device)
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
