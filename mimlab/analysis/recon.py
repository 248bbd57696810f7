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

With ``norm_pix`` the decoder predicts each patch standardised by its own mean/std
(``(t - mean) / sqrt(var + eps)``, MAE's ``norm_pix_loss``); the statistics themselves are not
predicted, so a prediction has to be given a mean and a std to become pixels again. Two ways,
both computed by :func:`reconstruct` and reported by ``analyze psnr`` / ``visualize``:

* ``true`` (keys ``*_true_stats``; as the MAE-pytorch / VideoMAE visualisation scripts do):
  every patch gets its own ground-truth mean and std, ``pred * sqrt(var + eps) + mean``. For a
  *masked* patch these come from the hidden pixels, so the reconstruction uses information the
  model never saw; others have called this an information leak (MAE-pytorch issue #40,
  VideoMAE issue #120): the patch's mean colour and contrast are given away, which flatters
  PSNR and the figure.
* ``visible`` (keys ``*_visible_stats``; no leak): a visible patch keeps its own statistics
  (they are part of the input); every masked patch of an image gets the same estimate from
  that image's visible patches only: the mean over the visible patches of their per-patch mean,
  and the mean over the visible patches of their per-patch std ``sqrt(var + eps)`` (the same
  unbiased variance and eps as the training target). An image with no visible patch gets
  mean 0 and std 1 (the data set's mean colour and spread, in normalised units).

Without ``norm_pix`` (SimMIM, ``method.target_norm=none``) predictions are pixels already and
both ways give the same reconstruction.
"""

from __future__ import annotations

import json
import math
import re
import time
from pathlib import Path
from typing import Optional, Sequence

import torch
from tqdm.auto import tqdm

from ..core.config import ConfigError, PretrainConfig, from_dict, resolve, to_dict
from ..io import checkpoint as ckpt_format
from ..io.plots import pyplot
from ..io.sources import SourceError, load_encoder, parse_source
from ..methods import build_method, is_siamese
from ..methods.masked import MaskedPrediction, PixelTarget
from ..methods.siamese import RelaxedMAE
from ..nn.augment import denormalize
from ..nn.ops import patchify, random_masking, unpatchify
from . import AnalysisError
from .common import analysis_dataset, checkpoint_stats, mask_noise, pick_device, resolve_split
from .metrics import psnr

STATS = ("visible", "true")  # how masked norm_pix patches get their mean / std back


def patch_stats(patches: torch.Tensor, eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-patch mean and std of patchified images [B, N, L] -> ([B, N, 1], [B, N, 1]).

    The statistics of MAE's ``norm_pix`` target (:func:`mimlab.nn.losses.patch_norm_target`): mean
    over the patch's L = p*p*C values and ``sqrt(var + eps)`` with the unbiased variance."""
    return patches.mean(-1, keepdim=True), (patches.var(-1, keepdim=True) + eps).sqrt()


def visible_stats(
    patches: torch.Tensor, mask: torch.Tensor, eps: float = 1e-6
) -> tuple[torch.Tensor, torch.Tensor]:
    """No-leak statistics for the patches of each image: ([B, N, 1], [B, N, 1]).

    ``patches`` [B, N, L] (patchified images), ``mask`` [B, N] (1 = removed). Visible patches
    keep their own mean/std (:func:`patch_stats`); every masked patch of image b gets
    ``mean_hat_b = sum_i (1 - m_bi) mu_bi / sum_i (1 - m_bi)`` and likewise ``std_hat_b`` from
    the per-patch stds sigma_bi: averages over the visible patches of the same image only, so
    no masked pixel enters. With no visible patch the estimate is mean 0, std 1."""
    mu, sd = patch_stats(patches, eps)  # [B, N, 1] each
    vis = (1.0 - mask.float()).unsqueeze(-1)  # [B, N, 1], 1 = visible
    n_vis = vis.sum(1, keepdim=True)  # [B, 1, 1]
    some = n_vis > 0
    mu_hat = torch.where(some, (mu * vis).sum(1, keepdim=True) / n_vis.clamp_min(1), 0.0)
    sd_hat = torch.where(some, (sd * vis).sum(1, keepdim=True) / n_vis.clamp_min(1), 1.0)
    return torch.where(vis > 0, mu, mu_hat), torch.where(vis > 0, sd, sd_hat)  # [B, N, 1]


def pred_to_patches(
    pred: torch.Tensor,
    images: torch.Tensor,
    p: int,
    norm_pix: bool,
    eps: float = 1e-6,
    mask: Optional[torch.Tensor] = None,
    stats: str = "true",
) -> torch.Tensor:
    """Predicted patches [B, N, p*p*C] back in the images' units (undo the per-patch norm).

    ``stats='true'``: each patch's own ground-truth mean/std (leaks into masked patches);
    ``stats='visible'``: masked patches (``mask`` [B, N], 1 = removed) get the estimate of
    :func:`visible_stats`. Without ``norm_pix`` the prediction is returned unchanged."""
    if stats not in STATS:
        raise ValueError(f"stats must be one of {' | '.join(STATS)}, got '{stats}'")
    if not norm_pix:
        return pred
    t = patchify(images, p)  # [B, N, p*p*C]
    if stats == "true":
        mu, sd = patch_stats(t, eps)
    else:
        if mask is None:
            raise ValueError("stats='visible' needs the mask [B, N]")
        mu, sd = visible_stats(t, mask, eps)
    return pred * sd + mu


@torch.no_grad()
def reconstruct(
    method,
    images: torch.Tensor,
    noise: Optional[torch.Tensor] = None,
    mask: Optional[torch.Tensor] = None,
) -> dict:
    """Run a reconstructive method once; returns normalised-image tensors [B, C, H, W]:
    ``original``, ``masked`` (removed patches zeroed to the mean colour), ``recon`` (every
    patch predicted) and ``pasted`` (visible patches copied back), both with the true per-patch
    statistics (see the module docstring), ``recon_visible_stats`` and
    ``pasted_visible_stats`` (masked patches de-normalised with statistics of the visible
    patches only: no leak), plus ``mask`` [B, N] and ``norm_pix`` (bool).

    ``method``: MAE-like :class:`~mimlab.methods.masked.MaskedPrediction` with a pixel target
    or R-MAE (:class:`~mimlab.methods.siamese.RelaxedMAE`, whose ``pred`` is the shared
    decoder's reconstruction d(f(T1 x)) of the masked view). ``noise`` [B, N]: random masking
    at the method's own ratio; ``mask`` [B, N] (1 = removed): an explicit mask instead."""
    method.eval()
    if mask is None:
        out = method(images, noise=noise)
    else:
        out = (
            method(images, mask1=mask)
            if isinstance(method, RelaxedMAE)
            else method(images, mask=mask)
        )
    enc = method.encoder
    p, C = enc.patch_size, images.shape[1]
    norm_pix = getattr(method, "target_norm", "none") == "patch"
    pred, msk = out["pred"].float(), out["mask"]
    target = patchify(images, p)  # [B, N, p*p*C]
    m = msk.unsqueeze(-1).float()  # [B, N, 1]
    grid = enc.grid
    res = {
        "original": images,
        "masked": unpatchify(target * (1 - m), p, grid, C),
        "mask": msk,
        "norm_pix": norm_pix,
    }
    for stats, suffix in (("true", ""), ("visible", "_visible_stats")):
        patches = pred_to_patches(pred, images, p, norm_pix, mask=msk, stats=stats)
        res["recon" + suffix] = unpatchify(patches, p, grid, C)
        res["pasted" + suffix] = unpatchify(target * (1 - m) + patches * m, p, grid, C)
    return res


_PSNR_KEYS = {  # result key -> reconstruction key of :func:`reconstruct`
    "psnr_true_stats": "pasted",
    "psnr_visible_stats": "pasted_visible_stats",
    "psnr_all_predicted_true_stats": "recon",
    "psnr_all_predicted_visible_stats": "recon_visible_stats",
}
PSNR_NOTE = (
    "psnr = psnr_true_stats, psnr_all_predicted = psnr_all_predicted_true_stats "
    "(kept for comparability with earlier results): with norm_pix every masked patch "
    "gets its TRUE mean/std back, information from the hidden pixels (called a leak "
    "in MAE-pytorch #40 and VideoMAE #120). *_visible_stats: masked patches get the "
    "mean over the image's visible patches of their per-patch mean and std (no "
    "leak). Without norm_pix both are the same."
)


def per_image_psnr(rec: dict, mean, std) -> dict[str, torch.Tensor]:
    """Per-image PSNR [B] (dB, pixels in [0, 1]) of the four reconstructions of
    :func:`reconstruct`, keyed as in :data:`_PSNR_KEYS`: visible patches pasted back or every
    patch predicted, x true or visible-patch statistics."""
    o = denormalize(rec["original"].float(), mean, std)
    return {
        k: psnr(denormalize(rec[r].float(), mean, std), o, reduction="none")
        for k, r in _PSNR_KEYS.items()
    }


def _finite_mean(v: torch.Tensor) -> float:
    v = v[torch.isfinite(v)]
    return float(v.mean()) if len(v) else float("inf")


def reconstruction_psnr(rec: dict, mean, std) -> dict:
    """Mean PSNR (dB, pixels in [0, 1]) over the images of ``rec``: ``psnr_true_stats``,
    ``psnr_visible_stats`` (pasted), ``psnr_all_predicted_true_stats``,
    ``psnr_all_predicted_visible_stats``, and the older names ``psnr`` /
    ``psnr_all_predicted`` (= the true-stats values; see :data:`PSNR_NOTE`)."""
    res = {k: _finite_mean(v.cpu()) for k, v in per_image_psnr(rec, mean, std).items()}
    res["psnr"] = res["psnr_true_stats"]
    res["psnr_all_predicted"] = res["psnr_all_predicted_true_stats"]
    return res


def stats_label(norm_pix: bool, stats: str) -> str:
    """One line saying how the masked patches of a figure got their mean / std."""
    if not norm_pix:
        return "pixels predicted directly (no per-patch statistics needed)"
    if stats == "visible":
        return (
            "masked patches: mean/std estimated from the visible patches of the same "
            "image (no leak)"
        )
    return "masked patches: their TRUE per-patch mean/std (taken from the hidden pixels: a leak)"


def save_grid(
    rec: dict,
    mean,
    std,
    path: str | Path,
    n: int = 8,
    title: str = "",
    stats: str = "visible",
    row_labels: Optional[Sequence[str]] = None,
) -> Path:
    """PNG grid: rows = images; columns = original / masked / reconstruction / + visible.

    ``stats``: which reconstruction of :func:`reconstruct` is drawn, ``visible`` (default, no
    leak) or ``true``; the figure says which. ``row_labels``: one label per row (e.g. class)."""
    plt = pyplot()
    if stats not in STATS:
        raise ValueError(f"stats must be one of {' | '.join(STATS)}, got '{stats}'")
    sfx = "_visible_stats" if stats == "visible" else ""
    norm_pix = bool(rec.get("norm_pix", True))
    tag = (
        ""
        if not norm_pix
        else "\n(visible-patch stats)"
        if stats == "visible"
        else "\n(true patch stats)"
    )
    cols = [
        ("original", "original"),
        ("masked", "masked input"),
        ("recon" + sfx, "reconstruction" + tag),
        ("pasted" + sfx, "+ visible patches" + tag),
    ]
    n = min(n, rec["original"].shape[0])
    fig, axes = plt.subplots(n, 4, figsize=(4 * 1.6, n * 1.6 + 0.6), squeeze=False)
    for j, (key, label) in enumerate(cols):
        imgs = denormalize(rec[key][:n].float().cpu(), mean, std)
        for i in range(n):
            a = imgs[i].permute(1, 2, 0).numpy()
            ax = axes[i][j]
            ax.imshow(
                a[..., 0] if a.shape[2] == 1 else a[..., :3],
                cmap="gray" if a.shape[2] == 1 else None,
                interpolation="nearest",
            )
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(label, fontsize=7)
            if j == 0 and row_labels is not None and i < len(row_labels):
                ax.set_ylabel(str(row_labels[i]), fontsize=7)
    fig.suptitle((title + "\n" if title else "") + stats_label(norm_pix, stats), fontsize=8)
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
    try:
        src = parse_source(path)
        if src.kind != "mimlab":  # mae: / hf: with a decoder
            return _foreign_reconstructive(path)
        ck = ckpt_format.load(src.target, trust=trust)
    except (SourceError, ckpt_format.CheckpointError) as e:
        raise AnalysisError(str(e)) from None
    cfgd = dict(ck["config"])
    if ckpt_format.data_stats(ck) is not None:  # the normalisation it was trained with
        mean, std = ckpt_format.data_stats(ck)
        cfgd["data"] = {**(cfgd.get("data") or {}), "mean": mean, "std": std}
    if "method" not in cfgd:
        kind = "fine-tuned" if (cfgd.get("finetune") or {}).get("pretrained") else "supervised"
        raise AnalysisError(
            f"{path} is a {kind} classifier checkpoint: it has no pixel decoder, "
            "so there is nothing to reconstruct (use an MAE / R-MAE / SimMIM "
            "pretraining checkpoint)"
        )
    try:
        cfg = from_dict(PretrainConfig, cfgd)
    except ConfigError as e:
        raise AnalysisError(f"{path}: its config does not load: {e}") from None
    m = cfg.method
    rmae = m.target == "online" and is_siamese(cfg)
    pixels = m.target == "pixels" and not is_siamese(cfg)
    if not (rmae or pixels):
        what = (
            "contrastive embeddings (projector + " + m.loss + " against an EMA target)"
            if is_siamese(cfg)
            else _WHAT.get(m.target, f"'{m.target}' targets")
        )
        raise AnalysisError(
            f"{path} is a '{m.name}' checkpoint: it learns {what}, not pixels, "
            "so it has no pixel decoder to reconstruct with (use an MAE / R-MAE "
            "/ SimMIM checkpoint)"
        )
    if m.target_norm not in ("patch", "none"):
        raise AnalysisError(
            f"{path}: reconstructions with method.target_norm={m.target_norm} "
            "cannot be mapped back to pixels (only patch | none)"
        )
    method = build_method(cfg)
    missing, unexpected = method.load_state_dict(ck["model"], strict=False)
    if missing or unexpected:
        raise AnalysisError(
            f"{path}: weights do not fit method '{m.name}' (missing "
            f"{list(missing)[:4]}, unexpected {list(unexpected)[:4]})"
        )
    return method.eval(), cfg


def _foreign_reconstructive(spec: str):
    """``(MaskedPrediction, PretrainConfig)`` of a foreign source with an MAE decoder (official
    MAE files with ``decoder_*`` keys, transformers ``ViTMAEForPreTraining``)."""
    sm = load_encoder(spec)
    if sm.decoder is None:
        raise AnalysisError(
            f"{spec}: loaded without a pixel decoder (encoder only), so there "
            "is nothing to reconstruct (use an MAE file with its decoder, e.g. "
            "mae_visualize_*.pth, or hf: ViTMAEForPreTraining)"
        )
    cfg = resolve(PretrainConfig, overrides=["method.name=mae"])
    cfg.model = sm.model_config
    cfg.method.mask_ratio = sm.mask_ratio
    cfg.method.target_norm = "patch" if sm.norm_pix else "none"
    cfg.data.mean, cfg.data.std = sm.mean, sm.std
    method = MaskedPrediction(
        sm.encoder,
        sm.decoder,
        PixelTarget(sm.encoder.patch_size),
        mask_ratio=sm.mask_ratio,
        target_norm=cfg.method.target_norm,
    )
    return method.eval(), cfg


def _setup(
    checkpoint: str,
    data: Optional[str],
    ratio: Optional[float],
    split: str,
    images: Optional[int],
    seed: int,
    trust: bool,
):
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
    return random_masking(mask_noise(bi, B, N, seed), ratio)[1].to(device)


def default_psnr_path(spec: str) -> Path:
    """Where ``analyze psnr`` writes without ``--out``: beside a checkpoint file
    (``<stem>-psnr.json``), inside a model directory (``psnr.json``), else in the working
    directory under a file name made from the source spec."""
    src = parse_source(spec)
    target = Path(src.file or src.target)
    if target.is_dir():
        return target / "psnr.json"
    if target.is_file():
        return target.with_name(f"{target.stem}-psnr.json")
    return Path(re.sub(r"[^A-Za-z0-9_.-]+", "_", src.text).strip("_") + "-psnr.json")


def analyze_psnr(
    checkpoint: str,
    data: Optional[str] = None,
    images: Optional[int] = 1000,
    ratio: Optional[float] = None,
    seed: int = 0,
    batch: int = 64,
    split: str = "auto",
    out: Optional[str] = None,
    device: str = "auto",
    workers: int = 2,
    trust: bool = False,
    progress: bool = True,
    per_image: bool = False,
) -> dict:
    """``mimlab analyze psnr``: mean per-image PSNR (dB, pixels in [0, 1]) of the
    reconstructions of ``images`` held-out images (seeded subset, seeded masks), visible patches
    pasted back or every patch predicted, each with the true per-patch statistics (a leak for
    masked patches) and with statistics from the visible patches only (no leak); see the module
    docstring. Keys: ``psnr_true_stats``, ``psnr_visible_stats``,
    ``psnr_all_predicted_true_stats``, ``psnr_all_predicted_visible_stats``; ``psnr`` and
    ``psnr_all_predicted`` are the true-stats values (the older names, unchanged meaning), and
    ``psnr_note`` says so. ``per_image``: also ``per_image`` = {key: [dB per image, in the
    seeded subset's order, None where infinite]} for the two pasted-back keys, so that two
    checkpoints scored with the same seed (same images, same masks) can be paired image by
    image. Writes JSON to ``out`` (default ``<checkpoint dir>/<stem>-psnr.json``).
    """
    t0 = time.time()
    method, cfg, data, ratio, split, ds, mean, std = _setup(
        checkpoint, data, ratio, split, images, seed, trust
    )
    dev = pick_device(device)
    method.to(dev)
    loader = torch.utils.data.DataLoader(ds, batch_size=batch, shuffle=False, num_workers=workers)
    it = loader
    if progress:
        it = tqdm(loader, desc="psnr", unit="batch", leave=False)
    vals: dict[str, list] = {k: [] for k in _PSNR_KEYS}
    N = method.encoder.num_patches
    for bi, batch in enumerate(it):
        x = batch.images.to(dev)
        rec = reconstruct(method, x, mask=_masks(bi, x.shape[0], N, ratio, seed, dev))
        for k, v in per_image_psnr(rec, mean, std).items():
            vals[k].append(v.cpu())
    ps = {k: _finite_mean(torch.cat(v)) for k, v in vals.items()}
    norm_pix = cfg.method.target_norm == "patch"
    res = {
        "command": "analyze psnr",
        "checkpoint": str(checkpoint),
        "method": cfg.method.name,
        "data": data,
        "split": split,
        "images": len(ds),
        "mask_ratio": ratio,
        "seed": seed,
        "psnr": ps["psnr_true_stats"],
        "psnr_all_predicted": ps["psnr_all_predicted_true_stats"],
        **ps,
        "psnr_note": PSNR_NOTE,
        "norm_pix": norm_pix,
        "data_mean": mean,
        "data_std": std,
        "seconds": round(time.time() - t0, 1),
    }
    if per_image:
        res["per_image"] = {
            k: [round(x, 3) if math.isfinite(x) else None for x in torch.cat(vals[k]).tolist()]
            for k in ("psnr_true_stats", "psnr_visible_stats")
        }
    path = Path(out) if out else default_psnr_path(str(checkpoint))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(res, indent=2))
    res["json"] = str(path)
    return res


def visualize_checkpoint(
    checkpoint: str,
    data: Optional[str] = None,
    n: int = 8,
    ratio: Optional[float] = None,
    seed: int = 0,
    out: Optional[str] = None,
    split: str = "auto",
    device: str = "auto",
    trust: bool = False,
    stats: str = "visible",
) -> dict:
    """``mimlab visualize``: PNG grid (original / masked / reconstruction / reconstruction
    with the visible patches pasted back) of the first ``n`` evaluation images (seeded subset),
    seeded masks; returns the paths and the PSNR of the shown images (every key of
    :func:`reconstruction_psnr`). ``stats``: ``visible`` (default: masked norm_pix patches get
    the visible patches' statistics, no leak) or ``true`` (their own true statistics); the
    figure's title says which it shows."""
    if n < 1:
        raise AnalysisError("--n must be >= 1")
    if stats not in STATS:
        raise AnalysisError(f"--stats must be one of {' | '.join(STATS)}, got '{stats}'")
    method, cfg, data, ratio, split, ds, mean, std = _setup(
        checkpoint, data, ratio, split, n, seed, trust
    )
    dev = pick_device(device)
    method.to(dev)
    x = torch.stack([ds[i].images for i in range(min(n, len(ds)))]).to(dev)
    rec = reconstruct(
        method, x, mask=_masks(0, x.shape[0], method.encoder.num_patches, ratio, seed, dev)
    )
    ps = reconstruction_psnr(rec, mean, std)
    p = Path(checkpoint)
    path = Path(out) if out else p.with_name(f"{p.stem}-recon.png")
    path.parent.mkdir(parents=True, exist_ok=True)
    shown = ps["psnr_visible_stats"] if stats == "visible" else ps["psnr_true_stats"]
    other = (
        "with true patch stats {:.2f} dB".format(ps["psnr_true_stats"])
        if stats == "visible"
        else "with visible-patch stats {:.2f} dB".format(ps["psnr_visible_stats"])
    )
    title = (
        f"{cfg.method.name}, mask ratio {ratio:g}; PSNR of these {x.shape[0]} images "
        f"{shown:.2f} dB as shown" + (f" ({other})" if rec["norm_pix"] else "")
    )
    save_grid(rec, mean, std, path, n=n, title=title, stats=stats)
    return {
        "command": "visualize",
        "checkpoint": str(checkpoint),
        "method": cfg.method.name,
        "data": data,
        "split": split,
        "images": int(x.shape[0]),
        "mask_ratio": ratio,
        "seed": seed,
        "png": str(path),
        "stats": stats,
        "psnr_shown": shown,
        **ps,
        "psnr_note": PSNR_NOTE,
    }
