"""Reconstructions of reconstructive methods: de-normalisation, PSNR and image grids.

With ``norm_pix`` the decoder predicts each patch standardised by its own mean/std; the
statistics are not predicted, so (as in MAE's visualisations) a reconstruction is shown with
the *ground-truth* per-patch mean and std put back: ``pred * sqrt(var + eps) + mean``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import torch

from ..ops import patchify, unpatchify
from .metrics import psnr


def denormalize(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """Dataset-normalised images [B, C, H, W] -> pixel values in [0, 1] (clamped)."""
    m = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return (x * s + m).clamp(0, 1)


def pred_to_patches(pred: torch.Tensor, images: torch.Tensor, p: int, norm_pix: bool,
                    eps: float = 1e-6) -> torch.Tensor:
    """Predicted patches [B, N, p*p*C] back in the images' units (undo per-patch norm)."""
    if not norm_pix:
        return pred
    t = patchify(images, p)
    return pred * (t.var(-1, keepdim=True) + eps).sqrt() + t.mean(-1, keepdim=True)


@torch.no_grad()
def reconstruct(method, images: torch.Tensor, noise: Optional[torch.Tensor] = None) -> dict:
    """Run a reconstructive method once; returns normalised-image tensors [B, C, H, W]:
    ``original``, ``masked`` (removed patches zeroed to the mean colour), ``recon`` (every
    patch predicted) and ``pasted`` (visible patches copied back), plus ``mask`` [B, N]."""
    method.eval()
    out = method(images, noise=noise)
    enc = method.encoder
    p, C = enc.patch_size, images.shape[1]
    norm_pix = getattr(method, "target_norm", "none") == "patch"
    patches = pred_to_patches(out["pred"].float(), images, p, norm_pix)
    target = patchify(images, p)
    m = out["mask"].unsqueeze(-1).float()
    grid = enc.grid
    return {"original": images,
            "masked": unpatchify(target * (1 - m), p, grid, C),
            "recon": unpatchify(patches, p, grid, C),
            "pasted": unpatchify(target * (1 - m) + patches * m, p, grid, C),
            "mask": out["mask"]}


def reconstruction_psnr(rec: dict, mean, std) -> dict:
    """PSNR (dB, pixels in [0, 1]) of the pasted and of the fully predicted reconstruction."""
    o = denormalize(rec["original"], mean, std)
    return {"psnr": float(psnr(denormalize(rec["pasted"], mean, std), o)),
            "psnr_all_predicted": float(psnr(denormalize(rec["recon"], mean, std), o))}


def save_grid(rec: dict, mean, std, path: str | Path, n: int = 8, title: str = "") -> Path:
    """PNG grid: rows = images; columns = original / masked / reconstruction / + visible."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    cols = [("original", "original"), ("masked", "masked input"), ("recon", "reconstruction"),
            ("pasted", "reconstruction + visible")]
    n = min(n, rec["original"].shape[0])
    fig, axes = plt.subplots(n, 4, figsize=(4 * 1.6, n * 1.6), squeeze=False)
    for j, (key, label) in enumerate(cols):
        imgs = denormalize(rec[key][:n].float().cpu(), mean, std)
        for i in range(n):
            a = imgs[i].permute(1, 2, 0).numpy()
            ax = axes[i][j]
            ax.imshow(a[..., 0] if a.shape[2] == 1 else a[..., :3],
                      cmap="gray" if a.shape[2] == 1 else None, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(label, fontsize=8)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
