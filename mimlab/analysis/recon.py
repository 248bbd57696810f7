"""Reconstructions of reconstructive methods: de-normalisation, PSNR and image grids;
``mimlab visualize`` (:func:`visualize_checkpoint`) and ``mimlab analyze psnr``
(:func:`analyze_psnr`).

Reconstructive checkpoints: masked prediction of pixels (MAE, SimMIM: ``method.target=pixels``)
and R-MAE (``method.target=online``; its ``forward`` returns the shared decoder's prediction
from the masked view T1 as ``pred``). C-MAE, MoCo v3, teacher-feature targets (MaskDistill,
MaskFeat, data2vec) and fine-tuned / supervised checkpoints have no pixel decoder: loading them
raises :class:`~mimlab.analysis.AnalysisError`. Masks come from
:func:`~mimlab.analysis.common.mask_noise` (seeded per batch) at ``--ratio`` (default: the
checkpoint's ``method.mask_ratio``), always MAE's random masking.

With ``norm_pix`` the decoder predicts each patch standardised by its own mean/std; the
statistics are not predicted, so (as in MAE's visualisations) a reconstruction is shown with
the *ground-truth* per-patch mean and std put back: ``pred * sqrt(var + eps) + mean``.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Optional, Sequence

import torch

from ..ops import patchify, random_masking, unpatchify
from . import AnalysisError
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
def reconstruct(method, images: torch.Tensor, noise: Optional[torch.Tensor] = None,
                mask: Optional[torch.Tensor] = None) -> dict:
    """Run a reconstructive method once; returns normalised-image tensors [B, C, H, W]:
    ``original``, ``masked`` (removed patches zeroed to the mean colour), ``recon`` (every
    patch predicted) and ``pasted`` (visible patches copied back), plus ``mask`` [B, N].

    ``method``: MAE-like :class:`~mimlab.methods.masked.MaskedPrediction` with a pixel target
    or R-MAE (:class:`~mimlab.methods.siamese.RelaxedMAE`, whose ``pred`` is the shared
    decoder's reconstruction d(f(T1 x)) of the masked view). ``noise`` [B, N]: random masking
    at the method's own ratio; ``mask`` [B, N] (1 = removed): an explicit mask instead."""
    method.eval()
    if mask is None:
        out = method(images, noise=noise)
    else:
        from ..methods.siamese import RelaxedMAE
        out = method(images, mask1=mask) if isinstance(method, RelaxedMAE) else \
            method(images, mask=mask)
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


# ------------------------------------------------------------------------------- commands
_WHAT = {"ema": "EMA-target features", "teacher": "frozen-teacher features", "hog": "HOG features"}


def load_reconstructive(path: str, trust: bool = False):
    """``(method, PretrainConfig)`` of a reconstructive pretraining checkpoint (eval mode);
    anything else raises :class:`AnalysisError` with one line saying why."""
    from ..config import ConfigError, PretrainConfig, from_dict
    from ..engine import load_checkpoint
    from ..methods import build_method, is_siamese
    ck = load_checkpoint(path, trust=trust)
    cfgd = ck.get("config") if isinstance(ck, dict) else None
    if not isinstance(cfgd, dict) or "model" not in cfgd:
        raise AnalysisError(f"{path}: not a mimlab checkpoint (no config); cannot reconstruct")
    if "method" not in cfgd:
        kind = "fine-tuned" if (cfgd.get("finetune") or {}).get("pretrained") else "supervised"
        raise AnalysisError(f"{path} is a {kind} classifier checkpoint: it has no pixel decoder, "
                            "so there is nothing to reconstruct (use an MAE / R-MAE / SimMIM "
                            "pretraining checkpoint)")
    try:
        cfg = from_dict(PretrainConfig, cfgd)
    except ConfigError as e:
        raise AnalysisError(f"{path}: its config does not load: {e}") from None
    m = cfg.method
    rmae = m.target == "online" and is_siamese(cfg)
    pixels = m.target == "pixels" and not is_siamese(cfg)
    if not (rmae or pixels):
        what = ("contrastive embeddings (projector + " + m.loss + " against an EMA target)"
                if is_siamese(cfg) else _WHAT.get(m.target, f"'{m.target}' targets"))
        raise AnalysisError(f"{path} is a '{m.name}' checkpoint: it learns {what}, not pixels, "
                            "so it has no pixel decoder to reconstruct with (use an MAE / R-MAE "
                            "/ SimMIM checkpoint)")
    if m.target_norm not in ("patch", "none"):
        raise AnalysisError(f"{path}: reconstructions with method.target_norm={m.target_norm} "
                            "cannot be mapped back to pixels (only patch | none)")
    method = build_method(cfg)
    missing, unexpected = method.load_state_dict(ck["model"], strict=False)
    if missing or unexpected:
        raise AnalysisError(f"{path}: weights do not fit method '{m.name}' (missing "
                            f"{list(missing)[:4]}, unexpected {list(unexpected)[:4]})")
    return method.eval(), cfg


def _setup(checkpoint: str, data: Optional[str], ratio: Optional[float], split: str,
           images: Optional[int], seed: int, trust: bool):
    from .common import analysis_dataset, checkpoint_stats, resolve_split
    from ..config import to_dict
    method, cfg = load_reconstructive(checkpoint, trust)
    data = data or cfg.data.path
    if not data:
        raise AnalysisError("no data: pass --data PATH")
    ratio = cfg.method.mask_ratio if ratio is None else float(ratio)
    if not 0.0 <= ratio < 1.0:
        raise AnalysisError(f"--ratio must be in [0, 1), got {ratio}")
    C = cfg.model.in_chans
    mean, std = checkpoint_stats(to_dict(cfg), data, C)
    split = resolve_split(data, split)
    ds = analysis_dataset(data, split, cfg.model.img_size, C, images, seed, mean, std)
    return method, cfg, data, ratio, split, ds, mean, std


def _masks(bi: int, B: int, N: int, ratio: float, seed: int, device) -> torch.Tensor:
    from .common import mask_noise
    return random_masking(mask_noise(bi, B, N, seed), ratio)[1].to(device)


def analyze_psnr(checkpoint: str, data: Optional[str] = None, images: Optional[int] = 1000,
                 ratio: Optional[float] = None, seed: int = 0, batch: int = 64,
                 split: str = "auto", out: Optional[str] = None, device: str = "auto",
                 workers: int = 2, trust: bool = False, progress: bool = True) -> dict:
    """``mimlab analyze psnr``: mean per-image PSNR (dB, pixels in [0, 1]) of the
    reconstructions of ``images`` held-out images (seeded subset, seeded masks): ``psnr`` with
    the visible patches pasted back, ``psnr_all_predicted`` with every patch predicted. norm_pix
    predictions get each patch's true mean/std back (:func:`pred_to_patches`). Writes JSON to
    ``out`` (default ``<checkpoint dir>/<stem>-psnr.json``)."""
    from .common import pick_device
    t0 = time.time()
    method, cfg, data, ratio, split, ds, mean, std = _setup(checkpoint, data, ratio, split,
                                                            images, seed, trust)
    dev = pick_device(device)
    method.to(dev)
    loader = torch.utils.data.DataLoader(ds, batch_size=batch, shuffle=False,
                                         num_workers=workers)
    it = loader
    if progress:
        from tqdm.auto import tqdm
        it = tqdm(loader, desc="psnr", unit="batch", leave=False)
    pasted, full = [], []
    N = method.encoder.num_patches
    for bi, (x, _, _) in enumerate(it):
        x = x.to(dev)
        rec = reconstruct(method, x, mask=_masks(bi, x.shape[0], N, ratio, seed, dev))
        o = denormalize(rec["original"].float(), mean, std)
        pasted.append(psnr(denormalize(rec["pasted"].float(), mean, std), o, reduction="none"))
        full.append(psnr(denormalize(rec["recon"].float(), mean, std), o, reduction="none"))

    def _mean(vals):
        v = torch.cat(vals).cpu()
        v = v[torch.isfinite(v)]
        return float(v.mean()) if len(v) else float("inf")

    res = {"command": "analyze psnr", "checkpoint": str(checkpoint), "method": cfg.method.name,
           "data": data, "split": split, "images": len(ds), "mask_ratio": ratio, "seed": seed,
           "psnr": _mean(pasted), "psnr_all_predicted": _mean(full),
           "norm_pix": cfg.method.target_norm == "patch", "data_mean": mean, "data_std": std,
           "seconds": round(time.time() - t0, 1)}
    p = Path(checkpoint)
    path = Path(out) if out else p.with_name(f"{p.stem}-psnr.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(res, indent=2))
    res["json"] = str(path)
    return res


def visualize_checkpoint(checkpoint: str, data: Optional[str] = None, n: int = 8,
                         ratio: Optional[float] = None, seed: int = 0,
                         out: Optional[str] = None, split: str = "auto",
                         device: str = "auto", trust: bool = False) -> dict:
    """``mimlab visualize``: PNG grid (original / masked / reconstruction / reconstruction
    with the visible patches pasted back) of the first ``n`` evaluation images (seeded subset),
    seeded masks; returns the paths and the PSNR of the shown images."""
    from .common import pick_device
    if n < 1:
        raise AnalysisError("--n must be >= 1")
    method, cfg, data, ratio, split, ds, mean, std = _setup(checkpoint, data, ratio, split, n,
                                                            seed, trust)
    dev = pick_device(device)
    method.to(dev)
    x = torch.stack([ds[i][0] for i in range(min(n, len(ds)))]).to(dev)
    rec = reconstruct(method, x, mask=_masks(0, x.shape[0], method.encoder.num_patches, ratio,
                                             seed, dev))
    ps = reconstruction_psnr(rec, mean, std)
    p = Path(checkpoint)
    path = Path(out) if out else p.with_name(f"{p.stem}-recon.png")
    path.parent.mkdir(parents=True, exist_ok=True)
    title = (f"{cfg.method.name}, mask ratio {ratio:g}; PSNR of these {x.shape[0]} images "
             f"{ps['psnr']:.2f} dB (all predicted {ps['psnr_all_predicted']:.2f} dB)")
    save_grid(rec, mean, std, path, n=n, title=title)
    return {"command": "visualize", "checkpoint": str(checkpoint), "method": cfg.method.name,
            "data": data, "split": split, "images": int(x.shape[0]), "mask_ratio": ratio,
            "seed": seed, "png": str(path), **ps}
