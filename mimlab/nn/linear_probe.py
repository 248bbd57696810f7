"""Linear heads trained on cached frozen features (pure tensor functions).

MAE's linear-probing recipe (He et al., 2022, A.3) on cached features: BatchNorm without
affine before the linear layer, SGD with momentum 0.9 and a cosine schedule; several learning
rates are trained in one pass (DINOv2 style), and the lr is chosen on held-out *training*
features, never on the test split.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F


def train_linear_heads(
    ftr: torch.Tensor,
    ytr: torch.Tensor,
    fte: torch.Tensor,
    num_classes: int,
    lrs: list[float],
    epochs: int,
    batch_size: int,
    weight_decay: float = 0.0,
    seed: int = 0,
) -> dict[float, torch.Tensor]:
    """Train one linear head per lr *in the same pass* over cached features.

    Features go through BatchNorm without affine (here with the statistics of the whole cached
    training set, i.e. BN's running statistics), then a linear layer; SGD momentum 0.9, cosine
    lr. ``ftr`` [N, D], ``ytr`` [N], ``fte`` [M, D]. Returns ``{lr: logits on fte [M, C]}``.
    Uses only its own seeded generator (the global RNG is untouched).
    """
    g = torch.Generator().manual_seed(seed)
    mu, sd = ftr.mean(0), ftr.std(0) + 1e-6
    xtr, xte = (ftr - mu) / sd, (fte - mu) / sd
    L, D = len(lrs), ftr.shape[1]
    W = torch.zeros(L, D, num_classes, requires_grad=True)
    b = torch.zeros(L, 1, num_classes, requires_grad=True)
    with torch.no_grad():
        W.normal_(0, 0.01, generator=g)
    lr_t = torch.tensor(lrs).view(L, 1, 1)
    mom_W, mom_b = torch.zeros_like(W), torch.zeros_like(b)
    n = len(xtr)
    steps = epochs * math.ceil(n / batch_size)
    step = 0
    for _ in range(epochs):
        perm = torch.randperm(n, generator=g)
        for i in range(0, n, batch_size):
            idx = perm[i : i + batch_size]
            x, y = xtr[idx], ytr[idx]
            logits = torch.einsum("nd,ldc->lnc", x, W) + b
            loss = F.cross_entropy(
                logits.reshape(-1, num_classes), y.repeat(L), reduction="sum"
            ) / len(idx)
            gW, gb = torch.autograd.grad(loss, [W, b])
            scale = 0.5 * (1 + math.cos(math.pi * step / steps))
            with torch.no_grad():
                gW = gW + weight_decay * W
                mom_W.mul_(0.9).add_(gW)
                mom_b.mul_(0.9).add_(gb)
                W -= lr_t * scale * mom_W
                b -= lr_t * scale * mom_b
            step += 1
    with torch.no_grad():
        logits = torch.einsum("nd,ldc->lnc", xte, W) + b
    return {lr: logits[i] for i, lr in enumerate(lrs)}


def choose_lr(
    ftr: torch.Tensor,
    ytr: torch.Tensor,
    fhold: torch.Tensor,
    yhold: torch.Tensor,
    num_classes: int,
    lrs: list[float],
    epochs: int,
    batch_size: int,
    weight_decay: float = 0.0,
    seed: int = 0,
    extend: int = 0,
    factor: float = 3.0,
) -> dict[float, float]:
    """Held-out top-1 (%) per lr of heads trained on (``ftr`` [N, D], ``ytr`` [N]) and scored on
    (``fhold`` [H, D], ``yhold`` [H]); the chosen lr is the argmax.

    ``extend``: while the best lr is the largest (smallest) tried and strictly better than every
    other, also train a head at ``lr * factor`` (``/ factor``), at most ``extend`` times, so that
    the choice does not sit at the grid's edge.
    """

    def score(grid: list[float]) -> dict[float, float]:
        heads = train_linear_heads(
            ftr, ytr, fhold, num_classes, grid, epochs, batch_size, weight_decay, seed
        )
        return {
            lr: 100.0 * float((lg.argmax(-1) == yhold).float().mean()) for lr, lg in heads.items()
        }

    acc = score(list(lrs))
    for _ in range(extend):
        nxt = beyond_edge(acc, factor)
        if nxt is None:
            break
        acc.update(score([float(f"{nxt:.6g}")]))
    return acc


def beyond_edge(scores: dict[float, float], factor: float) -> Optional[float]:
    """The next lr to try when the best of ``scores`` ({lr: score}) sits at the edge of the lrs
    tried and is strictly better than every other: ``best * factor`` at the top, ``best /
    factor`` at the bottom; None when the best is inside, or tied (a tie at the edge says
    nothing about beyond it)."""
    best, tried = max(scores, key=scores.get), sorted(scores)
    if len(tried) < 2 or tried[0] < best < tried[-1]:
        return None
    if scores[best] <= max(v for k, v in scores.items() if k != best):
        return None
    return best * factor if best == tried[-1] else best / factor


def probe_top1(
    ftr: torch.Tensor,
    ytr: torch.Tensor,
    fte: torch.Tensor,
    yte: torch.Tensor,
    num_classes: int,
    lrs: list[float],
    epochs: int,
    batch_size: int,
    weight_decay: float = 0.0,
    seed: int = 0,
    holdout: float = 0.1,
    extend: int = 0,
) -> tuple[float, float]:
    """Linear-probe top-1 (%) on (fte [M, D], yte [M]) and the lr used.

    The lr is chosen on a seeded ``holdout`` fraction of the training features (heads trained
    on the rest; ``extend``: see :func:`choose_lr`), then the chosen head is retrained on all of
    ``ftr`` [N, D] and scored once on the test features.
    """
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(ftr), generator=g)
    n_hold = max(1, int(len(ftr) * holdout))
    hold, fit = perm[:n_hold], perm[n_hold:]
    acc = choose_lr(
        ftr[fit],
        ytr[fit],
        ftr[hold],
        ytr[hold],
        num_classes,
        lrs,
        epochs,
        batch_size,
        weight_decay,
        seed,
        extend,
    )
    best = max(acc, key=acc.get)
    final = train_linear_heads(
        ftr, ytr, fte, num_classes, [best], epochs, batch_size, weight_decay, seed
    )[best]
    return 100.0 * int((final.argmax(-1) == yte).sum()) / max(len(yte), 1), best
