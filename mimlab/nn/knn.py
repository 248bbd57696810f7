"""Weighted k-NN classification on frozen features (pure tensor functions).

The protocol of Wu et al. (2018) as used by DINO / MAE k-NN evaluations: cosine similarity
between L2-normalised features, the ``k`` most similar training samples vote for their class
with weight ``exp(s / T)``, and the class with the largest summed weight wins.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def knn_classify(
    train_f: torch.Tensor,
    train_y: torch.Tensor,
    test_f: torch.Tensor,
    k: int,
    temperature: float,
    num_classes: int,
    chunk: int = 1024,
) -> torch.Tensor:
    """Weighted k-NN predictions.

    Args:
        train_f: bank features [N, D]; train_y: their labels [N] (int64, 0..num_classes-1).
        test_f: query features [M, D].
        k: neighbours (clipped to N); temperature: T of the vote weight exp(s / T).
        chunk: queries per similarity block (bounds memory to [chunk, N]).
    Returns:
        predicted labels [M] (int64).
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    tr = F.normalize(train_f.float(), dim=1)  # [N, D]
    te = F.normalize(test_f.float(), dim=1)  # [M, D]
    k = min(k, len(tr))
    preds = []
    for i in range(0, len(te), chunk):
        sim = te[i : i + chunk] @ tr.T  # [m, N] cosine similarities
        s, idx = sim.topk(k, dim=1)  # [m, k]
        votes = torch.zeros(len(s), num_classes)  # [m, C]
        votes.scatter_add_(1, train_y[idx], (s / temperature).exp())
        preds.append(votes.argmax(1))
    return torch.cat(preds) if preds else torch.zeros(0, dtype=torch.long)


def top1(pred: torch.Tensor, labels: torch.Tensor) -> float:
    """Top-1 accuracy in percent of predictions [M] against labels [M]."""
    return 100.0 * int((pred == labels).sum()) / len(labels) if len(labels) else 0.0
