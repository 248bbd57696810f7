"""Shared plumbing of the analysis commands: seeded mask noise, evaluation images, devices,
checkpoint labels and normalisation statistics."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Optional, Sequence

import torch

from ..core.config import DataConfig
from ..data.datasets import DataError, build_dataset, resolve_stats, scan_source

_MIX = 1_000_003


def mask_noise(batch_index: int, batch_size: int, num_patches: int, seed: int = 0) -> torch.Tensor:
    """The masking noise [batch_size, num_patches] (CPU, float32) of batch ``batch_index``.

    A pure function of ``(seed, batch_index, batch_size, num_patches)``: every model analysed
    with the same seed, data and batch size gets exactly the same tensor for the same batch, so
    comparisons between models are paired (same images, same masks). ``ops.random_masking``
    keeps the patches with the smallest noise, so masks of different ratios drawn from one noise
    tensor are nested (a higher ratio hides a superset of the patches a lower one hides).
    """
    g = torch.Generator().manual_seed((int(seed) * _MIX + int(batch_index) + 1) % (2**63))
    return torch.rand(batch_size, num_patches, generator=g)


def pick_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    d = torch.device(device)
    if d.type == "cuda" and not torch.cuda.is_available():
        raise DataError(f"--device {device}: CUDA is not available here")
    return d


def resolve_split(data: str, split: str = "auto") -> str:
    """'auto' -> 'val' (the held-out split, e.g. CIFAR-10's test/) when the data set has one,
    else 'train' (a plain folder of images)."""
    if split not in ("auto", "train", "val"):
        raise DataError(f"--split must be auto | train | val, got '{split}'")
    if split != "auto":
        return split
    try:
        scan_source(DataConfig(path=data), "val", labelled=False)
        return "val"
    except DataError:
        return "train"


def dataset_stats(data: str, in_chans: int) -> tuple[list[float], list[float]]:
    """Mean/std ``tasks.pretrain`` would use for this data set (known values or ImageNet's)."""
    cfg = DataConfig(path=data)
    try:
        src = scan_source(cfg, "train", labelled=False)
    except DataError:
        src = None
    return resolve_stats(cfg, src, in_chans)


def checkpoint_stats(
    ckpt_config: Optional[dict], data: str, in_chans: int
) -> tuple[list[float], list[float]]:
    """Normalisation a checkpoint's model expects: its explicit ``data.mean/std`` when the run
    set them, else what pretraining derives for ``data`` (the analysed data set)."""
    d = (ckpt_config or {}).get("data") or {}
    if d.get("mean") is not None and d.get("std") is not None and len(d["mean"]) == in_chans:
        return list(d["mean"]), list(d["std"])
    return dataset_stats(data, in_chans)


def analysis_dataset(
    data: str,
    split: str,
    img_size: int,
    in_chans: int,
    images: Optional[int],
    seed: int,
    mean: Sequence[float],
    std: Sequence[float],
):
    """Deterministic evaluation images (resize + centre crop + normalise, no augmentation),
    ``images`` of them (a seeded subset, as ``data.limit`` / ``data.val_limit`` choose)."""
    cfg = DataConfig(path=data)
    if split == "val":
        cfg.val_limit = images
    else:
        cfg.limit = images
    return build_dataset(
        cfg,
        split,
        img_size,
        in_chans,
        seed,
        train_aug=False,
        labelled=False,
        mean=list(mean),
        std=list(std),
    )


def checkpoint_label(path: str | Path) -> str:
    """Short name of a checkpoint: ``runs/<run>/checkpoints/last.pt`` -> ``<run>``,
    ``.../checkpoint-epoch5.pt`` -> ``<run>/checkpoint-epoch5``, else the file stem."""
    p = Path(path)
    if p.parent.name == "checkpoints" and p.parent.parent.name:
        run = p.parent.parent.name
        return run if p.stem == "last" else f"{run}/{p.stem}"
    return p.stem


def unique_labels(labels: Sequence[str]) -> list[str]:
    seen: dict[str, int] = {}
    out = []
    for lab in labels:
        n = seen.get(lab, 0)
        seen[lab] = n + 1
        out.append(lab if n == 0 else f"{lab}#{n + 1}")
    return out


def safe_name(label: str) -> str:
    """A label as a file-name fragment."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", label).strip("_") or "model"
