"""Block-wise CKA between representations of full and masked images (Fig. 1 of Kong & Zhang,
"Understanding MIM via Learning Occlusion Invariant Feature", 2022).

What is compared (``mode='drop'``, the default)
-----------------------------------------------
For each model, each mask ratio r and each transformer block l = 1..depth:

* the full image x goes through the encoder with all N patch tokens -> block-l output
  ``F_l(x)`` [B, 1 + N, D];
* the masked image is x with a fraction r of its patches *dropped* (MAE style: the masked
  tokens never enter the encoder; ``forward_features(x, ids_keep=...)``) -> block-l output
  ``F_l(x, keep)`` [B, 1 + K, D] with K = int(N (1 - r)) visible patch tokens;
* the class token is left out on both sides, and the full-image tokens are taken at the *same
  K visible positions* (``gather(F_l(x)[:, 1:], keep)``), so both sides hold the tokens of the
  same patches -- the only difference is whether the rest of the image was seen;
* each side is reduced per image by the mean over those K tokens (``CKAAccumulator`` with
  ``reduce='mean_tokens'``) -> ``[n_images, D]`` and ``[n_images, D]``;
* linear CKA between the two (exact over all images, accumulated in mini-batches).

So CKA_l(r) measures how similar, across the data set, the representation of the visible part
of an occluded image is to the representation the same patches get when nothing is occluded:
1 means occlusion-invariant features (up to isotropic scaling / rotation), the property Kong &
Zhang argue MIM learns. Why this choice: dropping tokens is how MAE / R-MAE encoders see masked
images in training and works for any checkpoint (fine-tuned and supervised encoders have no
mask token); comparing the same positions makes the token counts match and keeps the comparison
about *content given less context* rather than about which patches are present (a mean over all
N full-image tokens would differ from the masked mean even for a perfectly invariant encoder,
simply because it averages other patches). Block outputs are taken before the encoder's final
LayerNorm (fine-tuned checkpoints have none), so every checkpoint kind is measured at the same
place. The patch embedding (block 0) is not reported: the visible tokens are identical there.

``mode='mask_token'``: the masked image keeps all N tokens with the hidden patches replaced by
the encoder's learnable mask token (SimMIM / C-MAE style, ``forward_features(x, mask=...)``);
the same K visible positions are compared. Needs an encoder with a (trained) mask token: C-MAE,
SimMIM, MaskDistill checkpoints, or a random initialisation.

Cost: per batch and model one full pass plus one pass per ratio (on the visible tokens only in
``drop`` mode). Memory: the CKA statistics of one model at a time, 3 d x d float64 matrices per
(ratio, block) on the compute device -- ViT-B (d = 768), 9 ratios x 12 blocks: ~1.5 GB; models
are processed one after another. Linear CKA is biased upwards when the number of images is
small compared with d: use hundreds of images (default 512).

Masks are seeded by ``(seed, batch index)`` (:func:`~mimlab.analysis.common.mask_noise`) and are
the same for every model; one noise tensor per batch serves every ratio (nested masks). Images
are a fixed, seeded subset in a fixed order with the evaluation transform (no augmentation).
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..core.config import ModelConfig, PretrainConfig, resolve, to_dict
from ..io.checkpoint import CheckpointError
from ..io.plots import pyplot
from ..io.sources import SourceError, SourceModel, source_label
from ..io.sources import load_encoder as load_source
from ..nn.augment import convert_normalization
from ..nn.models import ViTEncoder, build_encoder
from ..nn.ops import gather_tokens, num_visible, random_masking
from . import AnalysisError
from .common import (
    analysis_dataset,
    dataset_stats,
    mask_noise,
    pick_device,
    resolve_split,
    safe_name,
    unique_labels,
)
from .metrics import CKAAccumulator

log = logging.getLogger("mimlab.analysis")

DEFAULT_RATIOS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
MODES = ("drop", "mask_token")


@dataclass
class AnalysedModel:
    """An encoder to analyse, its name and the normalisation its inputs need."""

    label: str
    encoder: ViTEncoder
    source: str  # model source spec or 'random-init'
    kind: str  # pretrain method name | finetune | supervised | random
    mean: Optional[list] = None  # the model's own input normalisation (None: data set's)
    std: Optional[list] = None
    config: Optional[dict] = None  # the checkpoint's config (mimlab sources only)
    model_config: Optional[ModelConfig] = None
    loaded: str = ""  # the source's one-line load description


def source_kind(sm: SourceModel) -> str:
    """pretrain method name | finetune | supervised | the foreign source's kind."""
    if sm.kind != "mimlab":
        return sm.kind
    if sm.checkpoint is not None and sm.checkpoint.get("kind") == "finetune":
        return "finetune" if sm.method else "supervised"
    return str(sm.method or "pretrain")


def load_encoder(spec: str, trust: bool = False) -> tuple[ViTEncoder, SourceModel]:
    """The encoder of any model source (:mod:`mimlab.io.sources`: mimlab checkpoints of every
    kind, ``mae:``, ``timm:``, ``hf:``, ``mocov3:``) in eval mode, and the loaded model (its
    preprocessing and description)."""
    try:
        sm = load_source(spec, trust=trust)
    except (SourceError, CheckpointError) as e:
        raise AnalysisError(str(e)) from None
    return sm.encoder.eval(), sm


def random_model_config(
    preset: Optional[str], overrides: Sequence[str] = (), like: Optional[ModelConfig] = None
) -> ModelConfig:
    """Architecture of a random initialisation: ``model.preset`` (+ ``model.*`` overrides), or
    the first checkpoint's architecture when no preset is given."""
    ov = list(overrides)
    bad = [o for o in ov if not o.startswith("model.")]
    if bad:
        raise AnalysisError(f"only model.* overrides apply (to --random-init), got {bad}")
    if preset:
        ov = [o for o in ov if not o.startswith("model.preset=")] + [f"model.preset={preset}"]
    if not any(o.startswith("model.preset=") for o in ov):
        if like is None:
            raise AnalysisError(
                "--random-init needs a preset (--random-init tiny or "
                "model.preset=tiny) when no checkpoint is given"
            )
        base = {"model": to_dict(like)}
        return resolve(PretrainConfig, overrides=ov, base=base).model
    return resolve(PretrainConfig, overrides=ov).model


def random_encoder(mc: ModelConfig, seed: int = 0) -> ViTEncoder:
    """A seeded random initialisation (MAE's init; with a mask token)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        enc = build_encoder(mc, mask_token=True, drop_path=0.0)
    return enc.eval()


def _check_ratios(ratios: Sequence[float]) -> list[float]:
    out = [float(r) for r in ratios]
    if not out:
        raise AnalysisError("--ratios: give at least one mask ratio")
    bad = [r for r in out if not 0.0 <= r < 1.0]
    if bad:
        raise AnalysisError(f"--ratios: mask ratios must be in [0, 1), got {bad}")
    return out


@torch.no_grad()
def block_pairs(
    encoder: ViTEncoder,
    images: torch.Tensor,
    ids_keep: torch.Tensor,
    full_blocks: Sequence[torch.Tensor],
    mode: str = "drop",
):
    """Per block, (full-image tokens at the visible positions, masked-image visible tokens),
    both [B, K, D] in the order of ``ids_keep`` (see the module docstring)."""
    if mode == "drop":
        _, blocks = encoder.forward_features(
            images, ids_keep=ids_keep, return_blocks=True, apply_norm=False
        )
        masked = [b[:, 1:, :] for b in blocks]
    elif mode == "mask_token":
        N = encoder.num_patches
        mask = torch.ones(images.shape[0], N, device=images.device)
        mask.scatter_(1, ids_keep, 0.0)
        _, blocks = encoder.forward_features(
            images, mask=mask, return_blocks=True, apply_norm=False
        )
        masked = [gather_tokens(b[:, 1:, :], ids_keep) for b in blocks]
    else:
        raise AnalysisError(f"--mode must be one of {' | '.join(MODES)}, got '{mode}'")
    full = [gather_tokens(b[:, 1:, :], ids_keep) for b in full_blocks]
    return list(zip(full, masked))


def noise_digest(noise: torch.Tensor) -> str:
    return hashlib.sha1(noise.contiguous().cpu().numpy().tobytes()).hexdigest()[:16]


@torch.no_grad()
def model_cka(
    model: AnalysedModel,
    loader,
    data_stats: tuple,
    ratios: Sequence[float],
    seed: int = 0,
    mode: str = "drop",
    device: Optional[torch.device] = None,
    progress: bool = True,
) -> tuple[dict, list[str]]:
    """``{(ratio, block): CKA}`` (block 1-based) for one model, and the digest of the noise
    used for every batch (identical across models by construction). ``device``: CPU when
    None."""
    device = device if device is not None else torch.device("cpu")
    enc = model.encoder.to(device).eval()
    N = enc.num_patches
    acc = CKAAccumulator(reduce="mean_tokens")
    digests = []
    it = loader
    if progress:
        it = tqdm(loader, desc=f"cka {model.label}", unit="batch", leave=False)
    for bi, batch in enumerate(it):
        x = batch.images
        noise = mask_noise(bi, x.shape[0], N, seed)
        digests.append(noise_digest(noise))
        x = convert_normalization(x, data_stats, (model.mean, model.std)).to(device)
        if x.shape[-1] != enc.img_size:  # a model of another resolution (same patch grid)
            x = F.interpolate(
                x,
                size=(enc.img_size, enc.img_size),
                mode="bicubic",
                align_corners=False,
                antialias=True,
            )
        noise = noise.to(device)
        _, full_blocks = enc.forward_features(x, return_blocks=True, apply_norm=False)
        for ri, r in enumerate(ratios):
            ids_keep = random_masking(noise, r)[0]
            for bl, (f, m) in enumerate(block_pairs(enc, x, ids_keep, full_blocks, mode), 1):
                acc.update((ri, bl), f, m)
    vals = {(ratios[ri], bl): float(v) for (ri, bl), v in acc.values().items()}
    model.encoder.to("cpu")
    return vals, digests


# ------------------------------------------------------------------------------- plots
def plot_model(
    values: dict, ratios: Sequence[float], depth: int, label: str, path: Path, mode: str = "drop"
) -> Path:
    """Fig. 1 style: x = block index, one line per mask ratio (colour map)."""
    plt = pyplot()
    cmap = plt.get_cmap("viridis")
    fig, ax = plt.subplots(figsize=(5.2, 3.6))
    blocks = list(range(1, depth + 1))
    lo = 1.0
    for i, r in enumerate(ratios):
        ys = [values[(r, b)] for b in blocks]
        lo = min([lo] + [y for y in ys if y == y])
        c = cmap(i / max(1, len(ratios) - 1))
        ax.plot(blocks, ys, marker="o", ms=3, lw=1.4, color=c, label=f"{r:g}")
    ax.set_xlabel("block")
    ax.set_ylabel("linear CKA (full vs masked)")
    ax.set_xticks(blocks if depth <= 24 else blocks[::2])
    ax.set_ylim(max(0.0, lo - 0.05), 1.01)
    ax.grid(alpha=0.3)
    ax.set_title(f"{label}  ({'dropped' if mode == 'drop' else 'mask-token'} patches)", fontsize=9)
    ax.legend(
        title="mask ratio",
        fontsize=7,
        title_fontsize=7,
        loc="lower left",
        ncol=2 if len(ratios) > 5 else 1,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path


def plot_last_block(results: dict, ratios: Sequence[float], depths: dict, path: Path) -> Path:
    """Last block's CKA vs mask ratio, one line per model."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.2, 3.6))
    lo = 1.0
    for label, vals in results.items():
        ys = [vals[(r, depths[label])] for r in ratios]
        lo = min([lo] + [y for y in ys if y == y])
        ax.plot(ratios, ys, marker="o", ms=3, lw=1.4, label=label)
    ax.set_xlabel("mask ratio")
    ax.set_ylabel("linear CKA at the last block")
    ax.set_ylim(max(0.0, lo - 0.05), 1.01)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower left")
    ax.set_title("occlusion invariance of the last block", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path


# ------------------------------------------------------------------------------- command
def analyze_cka(
    data: Optional[str],
    checkpoints: Sequence[str] = (),
    random_init: Sequence[str] = (),
    model_overrides: Sequence[str] = (),
    ratios: Sequence[float] = DEFAULT_RATIOS,
    images: Optional[int] = 512,
    batch: int = 64,
    out: Optional[str] = None,
    mode: str = "drop",
    seed: int = 0,
    split: str = "auto",
    device: str = "auto",
    workers: int = 2,
    labels: Optional[Sequence[str]] = None,
    trust: bool = False,
    progress: bool = True,
) -> dict:
    """``mimlab analyze cka``: see the module docstring. ``random_init``: one entry per random
    initialisation, a model preset or '' (= ``model.preset`` of ``model_overrides``, else the
    first checkpoint's architecture). Writes ``cka.csv`` (model, ratio, block, cka),
    ``cka.json`` (settings, models, per-batch noise digests, values), ``cka_<model>.png`` per
    model and ``cka_last_block.png``; returns a summary dict."""
    ratios = _check_ratios(ratios)
    if mode not in MODES:
        raise AnalysisError(f"--mode must be one of {' | '.join(MODES)}, got '{mode}'")
    if batch < 1 or (images is not None and images < 1):
        raise AnalysisError("--batch and --images must be >= 1")
    random_init = list(random_init)
    if model_overrides and not random_init:
        random_init = [""]  # model.preset=... alone asks for a random initialisation
    if not checkpoints and not random_init:
        raise AnalysisError("nothing to analyse: give --checkpoints and/or --random-init")
    t0 = time.time()
    models: list[AnalysedModel] = []
    for p in checkpoints:  # any model source, each with its own preprocessing
        enc, sm = load_encoder(p, trust)
        cfg = sm.checkpoint.get("config") if sm.checkpoint is not None else None
        models.append(
            AnalysedModel(
                source_label(p),
                enc,
                str(p),
                source_kind(sm),
                sm.mean,
                sm.std,
                config=cfg,
                model_config=sm.model_config,
                loaded=sm.description,
            )
        )
    if data is None:
        data = next(
            (
                m.config.get("data", {}).get("path")
                for m in models
                if m.config and m.config.get("data", {}).get("path")
            ),
            None,
        )
        if data is None:
            raise AnalysisError("no data: pass --data PATH")
    like = models[0].model_config if models else None
    for i, preset in enumerate(random_init):
        mc = random_model_config(preset, model_overrides, like)
        models.append(
            AnalysedModel(
                f"random-{mc.preset or 'init'}",
                random_encoder(mc, seed + i),
                "random-init",
                "random",
            )
        )
    names = list(labels) if labels else [m.label for m in models]
    if len(names) != len(models):
        raise AnalysisError(f"--labels: {len(names)} labels for {len(models)} models")
    for m, lab in zip(models, unique_labels(names)):
        m.label = lab
    # every model must see the same images and masks: same patch grid and channels (inputs
    # are resized to each model's resolution, normalised with each model's statistics)
    e0 = models[0].encoder
    for m in models[1:]:
        e = m.encoder
        if (e.grid, e.in_chans) != (e0.grid, e0.in_chans):
            raise AnalysisError(
                f"models must share the patch grid and channels to be compared on the same "
                f"masked images: {models[0].label} has {e0.grid[0]}x{e0.grid[1]} patches/"
                f"{e0.in_chans}ch, {m.label} has {e.grid[0]}x{e.grid[1]}/{e.in_chans}ch"
            )
    if mode == "mask_token":
        lacking = [m.label for m in models if m.encoder.mask_token is None]
        if lacking:
            raise AnalysisError(
                f"--mode mask_token needs encoders with a mask token; "
                f"{', '.join(lacking)} has none (trained with dropped tokens or "
                f"fine-tuned): use --mode drop"
            )
    C, size = e0.in_chans, max(m.encoder.img_size for m in models)
    stats = dataset_stats(data, C)
    for m in models:
        if m.mean is None or m.std is None or len(m.mean) != C:
            m.mean, m.std = stats
    split = resolve_split(data, split)
    ds = analysis_dataset(data, split, size, C, images, seed, *stats)
    loader = torch.utils.data.DataLoader(ds, batch_size=batch, shuffle=False, num_workers=workers)
    dev = pick_device(device)
    N = e0.num_patches
    log.info(
        "CKA of %d model(s) on %d %s images of %s, ratios %s (visible tokens %s)",
        len(models),
        len(ds),
        split,
        data,
        ratios,
        [num_visible(N, r) for r in ratios],
    )

    out_dir = Path(out) if out else Path("runs") / f"cka-{time.strftime('%Y%m%d-%H%M%S')}"
    out_dir.mkdir(parents=True, exist_ok=True)
    results, digests, depths = {}, {}, {}
    for m in models:
        results[m.label], digests[m.label] = model_cka(
            m, loader, stats, ratios, seed, mode, dev, progress
        )
        depths[m.label] = m.encoder.depth
    csv_path = out_dir / "cka.csv"
    with open(csv_path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["model", "ratio", "block", "cka"])
        for m in models:
            for r in ratios:
                for b in range(1, depths[m.label] + 1):
                    w.writerow([m.label, f"{r:g}", b, f"{results[m.label][(r, b)]:.6f}"])
    plots = [
        str(
            plot_model(
                results[m.label],
                ratios,
                depths[m.label],
                m.label,
                out_dir / f"cka_{safe_name(m.label)}.png",
                mode,
            )
        )
        for m in models
    ]
    plots.append(str(plot_last_block(results, ratios, depths, out_dir / "cka_last_block.png")))
    last = {
        m.label: {f"{r:g}": results[m.label][(r, depths[m.label])] for r in ratios} for m in models
    }
    summary = {
        "command": "analyze cka",
        "out_dir": str(out_dir),
        "csv": str(csv_path),
        "plots": plots,
        "data": data,
        "split": split,
        "images": len(ds),
        "batch": batch,
        "seed": seed,
        "mode": mode,
        "ratios": ratios,
        "visible_tokens": {f"{r:g}": num_visible(N, r) for r in ratios},
        "models": [
            {
                "label": m.label,
                "source": m.source,
                "kind": m.kind,
                "depth": m.encoder.depth,
                "embed_dim": m.encoder.embed_dim,
                "mean": m.mean,
                "std": m.std,
                "loaded": m.loaded,
            }
            for m in models
        ],
        "last_block_cka": last,
        "seconds": round(time.time() - t0, 1),
    }
    full = dict(
        summary,
        noise_digests=digests,
        cka={
            lab: {f"{r:g}": [vals[(r, b)] for b in range(1, depths[lab] + 1)] for r in ratios}
            for lab, vals in results.items()
        },
    )
    (out_dir / "cka.json").write_text(json.dumps(full, indent=2))
    return summary


def format_summary(summary: dict) -> str:
    """Text table: last block's CKA per model and ratio, then the files written."""
    ratios = [f"{r:g}" for r in summary["ratios"]]
    labels = list(summary["last_block_cka"])
    w = max([len("model")] + [len(x) for x in labels])
    lines = [f"loaded {m['loaded']}" for m in summary["models"] if m.get("loaded")]
    lines += [
        f"last-block linear CKA (full vs masked, {summary['mode']}) on "
        f"{summary['images']} {summary['split']} images",
        "model".ljust(w) + "  " + "  ".join(r.rjust(6) for r in ratios),
    ]
    for lab in labels:
        row = summary["last_block_cka"][lab]
        lines.append(lab.ljust(w) + "  " + "  ".join(f"{row[r]:6.3f}" for r in ratios))
    lines.append(f"wrote {summary['csv']}, {Path(summary['out_dir']) / 'cka.json'}")
    lines += [f"wrote {p}" for p in summary["plots"]]
    return "\n".join(lines)
