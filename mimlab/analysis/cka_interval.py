"""One model's last-block CKA(masked, full) with a bootstrap interval over the images.

:func:`mimlab.analysis.cka.analyze_cka` gives every block and ratio of several models as exact
point values (accumulated Gram statistics, no per-image features kept). Protocol v2's claim (e)
needs one number per model and run with its uncertainty over the images: this module keeps the
per-image features of the last block at one mask ratio (the same seeded images and masks as
``analyze cka``: :func:`~mimlab.analysis.common.mask_noise`, dropped patches, class token left
out, the full image's tokens taken at the visible positions, both sides averaged over those
tokens) and resamples the images with replacement. The interval over pretraining runs is the
evidence suite's business (Welch on the per-run values).
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from ..nn.augment import convert_normalization
from ..nn.ops import random_masking
from . import AnalysisError
from .cka import block_pairs, load_encoder, random_encoder, random_model_config
from .common import analysis_dataset, dataset_stats, mask_noise, resolve_split
from .metrics import linear_cka


@torch.no_grad()
def last_block_features(
    encoder, loader, data_stats: tuple, model_stats: tuple, ratio: float, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per image, the last block's mean over the visible tokens of the full image and of the
    masked image: two ``[n, D]`` float64 tensors in the loader's order."""
    full, masked = [], []
    N = encoder.num_patches
    for bi, batch in enumerate(loader):
        x = convert_normalization(batch.images, data_stats, model_stats)
        if x.shape[-1] != encoder.img_size:
            raise AnalysisError(
                f"images of {x.shape[-1]} px for an encoder of {encoder.img_size} px: "
                "use analyze cka for models of another resolution"
            )
        noise = mask_noise(bi, x.shape[0], N, seed)
        ids_keep = random_masking(noise, ratio)[0]
        _, blocks = encoder.forward_features(x, return_blocks=True, apply_norm=False)
        f, m = block_pairs(encoder, x, ids_keep, blocks)[-1]
        full.append(f.mean(dim=1).double())
        masked.append(m.mean(dim=1).double())
    return torch.cat(full), torch.cat(masked)


def bootstrap_cka(
    x: torch.Tensor, y: torch.Tensor, resamples: int = 1000, seed: int = 0, level: float = 0.95
) -> dict:
    """Linear CKA of ``x`` and ``y`` (same images in the same order) and its percentile
    bootstrap interval over the images (``resamples`` draws with replacement, seeded)."""
    if x.shape[0] < 2:
        raise AnalysisError("a bootstrap interval needs at least 2 images")
    rng = np.random.default_rng(seed)
    n = x.shape[0]
    boot = np.array(
        [
            float(linear_cka(x[idx], y[idx]))
            for idx in (torch.from_numpy(rng.integers(0, n, n)) for _ in range(resamples))
        ]
    )
    q = (1.0 - level) / 2.0
    return {
        "cka": float(linear_cka(x, y)),
        "boot_lo": float(np.nanquantile(boot, q)),
        "boot_hi": float(np.nanquantile(boot, 1.0 - q)),
        "boot_sd": float(np.nanstd(boot, ddof=1)),
        "resamples": resamples,
        "level": level,
    }


def occlusion_cka(
    data: str,
    checkpoint: Optional[str] = None,
    random_preset: Optional[str] = None,
    random_seed: int = 0,
    ratio: float = 0.75,
    images: int = 512,
    seed: int = 0,
    resamples: int = 1000,
    batch: int = 64,
    workers: int = 1,
    split: str = "auto",
) -> dict:
    """Last-block CKA(masked, full) at ``ratio`` of ``checkpoint`` (any model source) or of a
    random initialisation of ``random_preset`` (seed ``random_seed``), on ``images`` seeded
    evaluation images, with its bootstrap interval over them."""
    if (checkpoint is None) == (random_preset is None):
        raise AnalysisError("give a checkpoint or a random-init preset, not both")
    if not 0.0 <= ratio < 1.0:
        raise AnalysisError(f"mask ratio must be in [0, 1), got {ratio}")
    mean = std = None
    if checkpoint is not None:
        enc, sm = load_encoder(checkpoint)
        mean, std = sm.mean, sm.std
    else:
        enc = random_encoder(random_model_config(random_preset), random_seed)
    stats = dataset_stats(data, enc.in_chans)
    if mean is None or std is None or len(mean) != enc.in_chans:
        mean, std = stats
    split = resolve_split(data, split)
    ds = analysis_dataset(data, split, enc.img_size, enc.in_chans, images, seed, *stats)
    loader = torch.utils.data.DataLoader(ds, batch_size=batch, shuffle=False, num_workers=workers)
    x, y = last_block_features(enc.eval(), loader, stats, (mean, std), ratio, seed)
    return {
        **bootstrap_cka(x, y, resamples, seed),
        "ratio": ratio,
        "block": len(enc.blocks),
        "images": int(x.shape[0]),
        "split": split,
        "model": checkpoint or f"random-{random_preset}-s{random_seed}",
    }
