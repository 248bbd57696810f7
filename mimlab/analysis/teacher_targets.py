"""How spatially diverse are a frozen teacher's targets on the student's patch grid?

MaskDistill regresses the student's masked tokens onto a teacher's per-patch features. When the
teacher's map is coarser than the student's grid (EfficientNet-Lite0 at 64 px: a 2x2 map
upsampled to 8x8), the targets of neighbouring patches are almost the same vector and the task
is close to regressing one global vector. This module measures that on real images: the
targets as the loss sees them (teacher map resampled to the grid, then LayerNorm over channels
as ``method.target_norm=layernorm``), and the mean cosine similarity of 4-neighbour patch pairs
and of far pairs (grid distance at least half the grid side, Chebyshev).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..nn.teachers import build_teacher
from . import AnalysisError
from .common import analysis_dataset, dataset_stats, resolve_split


def grid_cosines(targets: torch.Tensor) -> dict:
    """``targets`` [B, h, w, C] -> mean cosine of 4-neighbour pairs and of far pairs."""
    B, h, w, C = targets.shape
    if h < 2 or w < 2:
        raise AnalysisError(f"a {h}x{w} grid has no neighbours to compare")
    t = F.normalize(targets.double().reshape(B, h * w, C), dim=-1)
    sim = t @ t.transpose(1, 2)  # [B, N, N]
    ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    ys, xs = ys.flatten(), xs.flatten()
    dy, dx = (ys[:, None] - ys[None]).abs(), (xs[:, None] - xs[None]).abs()
    near = (dy + dx) == 1
    far = torch.maximum(dy, dx) >= max(h, w) // 2
    return {
        "neighbour_cosine": float(sim[:, near].mean()),
        "far_cosine": float(sim[:, far].mean()),
        "grid": [h, w],
    }


@torch.no_grad()
def teacher_target_diversity(
    spec: str,
    data: str,
    teacher_size: int,
    grid: int,
    images: int = 256,
    batch: int = 32,
    student_size: int = 32,
    seed: int = 0,
) -> dict:
    """Spatial diversity of ``spec``'s targets (at ``teacher_size`` px, on a ``grid`` x
    ``grid`` student grid) over ``images`` seeded evaluation images of ``data``."""
    stats = dataset_stats(data, 3)
    teacher = build_teacher(spec, *stats, teacher_size=teacher_size)
    split = resolve_split(data, "auto")
    ds = analysis_dataset(data, split, student_size, 3, images, seed, *stats)
    loader = torch.utils.data.DataLoader(ds, batch_size=batch, shuffle=False, num_workers=0)
    raw_map, maps = None, []
    for b in loader:
        feat = teacher.features(teacher.preprocess(b.images)).float()
        raw_map = tuple(feat.shape[-2:])
        tgt = teacher(b.images, (grid, grid))  # [B, N, C] on the student grid
        tgt = F.layer_norm(tgt, tgt.shape[-1:])
        maps.append(tgt.reshape(tgt.shape[0], grid, grid, -1))
    out = grid_cosines(torch.cat(maps))
    return {
        **out,
        "teacher": spec,
        "teacher_size": teacher_size,
        "teacher_map": list(raw_map),
        "images": len(ds),
        "split": split,
    }
