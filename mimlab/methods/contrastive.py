"""Parts of the contrastive siamese methods (C-MAE, MoCo v3) that are not the encoder:
projector / predictor heads with batch statistics that are global under torch.distributed, the
gathering of keys across processes, and the choice of the token pairs.

Distributed training (``torchrun``, one process per device): the loss of each process is
``sum of its per-term losses / (global number of terms / world size)``, so the mean over the
processes -- which DistributedDataParallel's gradient averaging differentiates -- equals the loss
of one process on the global batch (tested with 2 gloo processes in tests/test_ddp.py).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as tdist
import torch.nn as nn
from torch import Tensor

from ..core.dist import rank, world_size


class _AllReduceSum(torch.autograd.Function):
    """Sum over the processes; the gradient of every input is the sum of the output gradients
    of every process (``d sum_r x_r / d x_local = 1`` on each process)."""

    @staticmethod
    def forward(ctx, t: Tensor) -> Tensor:  # noqa: D102
        t = t.clone()
        tdist.all_reduce(t)
        return t

    @staticmethod
    def backward(ctx, g: Tensor) -> Tensor:  # noqa: D102
        g = g.clone()
        tdist.all_reduce(g)
        return g


def all_reduce_sum(t: Tensor) -> Tensor:
    """Differentiable sum over the processes (identity in one process)."""
    return _AllReduceSum.apply(t) if world_size() > 1 else t


def gather_rows(t: Tensor) -> tuple[Tensor, int]:
    """Concatenate ``t`` [B_r, ...] of every process along dim 0 in rank order -> ([sum B_r,
    ...], offset of this process's rows). The other processes' rows carry no gradient, this
    process's rows keep ``t``'s graph (MoCo v3's ``concat_all_gather`` of the keys, which are
    computed without gradient anyway). Sizes may differ between processes. Bool tensors are
    returned as bool. One process: ``(t, 0)``."""
    W = world_size()
    if W == 1:
        return t, 0
    r = rank()
    n = torch.tensor([t.shape[0]], device=t.device, dtype=torch.long)
    sizes_t = [torch.zeros_like(n) for _ in range(W)]
    tdist.all_gather(sizes_t, n)
    sizes = [int(s.item()) for s in sizes_t]
    send = t.detach()
    if send.dtype == torch.bool:
        send = send.to(torch.uint8)
    if send.shape[0] < max(sizes):
        send = torch.cat([send, send.new_zeros(max(sizes) - send.shape[0], *send.shape[1:])])
    parts = [torch.empty_like(send) for _ in range(W)]
    tdist.all_gather(parts, send.contiguous())
    parts = [p[:s].to(t.dtype) for p, s in zip(parts, sizes)]
    parts[r] = t
    return torch.cat(parts), sum(sizes[:r])


def global_mean(total: Tensor, count: int | Tensor) -> Tensor:
    """``total`` (this process's sum of per-term losses) divided by the global number of terms
    over the world size (see the module docstring); zero (keeping the graph) without terms."""
    c = torch.as_tensor(count, dtype=torch.float32, device=total.device)
    W = world_size()
    if W > 1:
        c = all_reduce_sum(c.detach()) / W
    return torch.where(c > 0, total / c.clamp_min(1.0), total * 0.0)


class SyncBatchNorm1d(nn.BatchNorm1d):
    """``BatchNorm1d`` whose training statistics are those of the *global* batch when a process
    group with more than one process is initialised (MoCo v3 converts its heads to SyncBN);
    plain ``BatchNorm1d`` otherwise and in eval mode. Unlike ``torch.nn.SyncBatchNorm`` it also
    runs on CPU (gloo). Same parameters and buffers as ``BatchNorm1d`` (checkpoints load
    either way). Statistics in float32, two passes (mean, then the centred second moment), each
    one differentiable all-reduce; running statistics get the unbiased global variance.

    ``valid`` [n] bool (training): the statistics come from these rows only (the others are
    normalised with them too and are to be ignored by the caller): a fixed-shape stand-in for
    ``bn(x[valid])`` that reads nothing from the device."""

    def forward(self, x: Tensor, valid: Optional[Tensor] = None) -> Tensor:
        if not self.training or (valid is None and world_size() == 1):
            return super().forward(x)
        xf = x.float()  # [n, C]
        if valid is None:
            s = torch.cat([xf.sum(0), xf.new_tensor([xf.shape[0]])])
        else:
            wt = valid.to(xf.dtype).unsqueeze(1)  # [n, 1]
            xf_w = xf * wt
            s = torch.cat([xf_w.sum(0), wt.sum().reshape(1)])
        s = all_reduce_sum(s)
        n = s[-1]
        mean = s[:-1] / n.clamp_min(1.0)  # [C]
        sq = (xf - mean) ** 2  # [n, C]
        if valid is not None:
            sq = sq * wt
        var = all_reduce_sum(sq.sum(0)) / n.clamp_min(1.0)  # biased, [C]
        if self.track_running_stats and self.running_mean is not None:
            with torch.no_grad():
                m = self.momentum if self.momentum is not None else 0.1
                self.running_mean.mul_(1 - m).add_(m * mean.detach())
                unbiased = var.detach() * n / (n - 1).clamp_min(1.0)
                self.running_var.mul_(1 - m).add_(m * unbiased)
                self.num_batches_tracked.add_(1)
        y = (xf - mean) * torch.rsqrt(var + self.eps)
        if self.affine:
            y = y * self.weight + self.bias
        return y.to(x.dtype)


class MLPHead(nn.Module):
    """2-layer head ``Linear -> norm -> GELU -> Linear`` on [..., d_in] (C-MAE: "2-layer
    projector ... and 2-layer predictor, and use GELU as activation layer"). Tokens are
    flattened, so BatchNorm (``norm='bn'``, :class:`SyncBatchNorm1d`) normalises over every
    token given to the head, across processes under torch.distributed."""

    def __init__(self, d_in: int, hidden: int, d_out: int, norm: str = "bn"):
        super().__init__()
        self.fc1 = nn.Linear(d_in, hidden, bias=norm != "bn")
        self.norm = {
            "bn": lambda: SyncBatchNorm1d(hidden),
            "ln": lambda: nn.LayerNorm(hidden),
            "none": nn.Identity,
        }[norm]()
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, d_out)

    def forward(self, x: Tensor, valid: Optional[Tensor] = None) -> Tensor:
        """``valid`` [n] bool over the flattened rows: BatchNorm's statistics from those rows
        only (see :class:`SyncBatchNorm1d`); ignored by the other norms (row-wise)."""
        shape = x.shape
        h = self.fc1(x.reshape(-1, shape[-1]))  # [n, hidden]
        h = self.norm(h, valid) if isinstance(self.norm, SyncBatchNorm1d) else self.norm(h)
        h = self.act(h)
        return self.fc2(h).reshape(*shape[:-1], -1)


def query_positions(
    mask_q: Optional[Tensor],
    mask_k: Optional[Tensor],
    student: str,
    B: int,
    N: int,
    device,
    queries: str = "removed",
) -> Tensor:
    """[B, N] bool: positions whose online token (view with ``mask_q``) is a query and whose
    target token (view with ``mask_k``) is its key.

    * no patch masking in either view: every position;
    * ``student='mask_token'`` (both encoders output a token at every position): ``queries=
      'removed'`` -- removed in the online view and seen by the target view (for complementary
      views every position T1 removes, Eq. 5's ``1 - M``); ``queries='all'`` -- every position
      ("apply the loss ... to each patch token respectively", Tab. 3);
    * ``student='drop'`` (an encoder outputs only the tokens its view sees): the positions both
      views see, whatever ``queries`` says.
    """
    if mask_q is None and mask_k is None:
        return torch.ones(B, N, dtype=torch.bool, device=device)
    removed = (
        mask_q.bool() if mask_q is not None else torch.zeros(B, N, dtype=torch.bool, device=device)
    )
    seen_k = (
        ~mask_k.bool() if mask_k is not None else torch.ones(B, N, dtype=torch.bool, device=device)
    )
    if student == "mask_token":
        if queries == "all":
            return torch.ones(B, N, dtype=torch.bool, device=device)
        return removed & seen_k
    return ~removed & seen_k


def select_positions(sel: Tensor) -> tuple[Tensor, Tensor]:
    """[B, N] bool -> (idx [B, S], valid [B, S]): the selected positions of each row in grid
    order, padded to S = max count (``valid`` False on padding)."""
    counts = sel.sum(1)
    S = int(counts.max()) if sel.numel() else 0
    order = torch.argsort((~sel).to(torch.int8), dim=1, stable=True)
    idx = order[:, :S]
    valid = torch.arange(S, device=sel.device).unsqueeze(0) < counts.unsqueeze(1)
    return idx, valid


def scatter_rows(rows: Tensor, sel: Tensor) -> Tensor:
    """[M, D] rows of the selected positions (``sel`` [B, N] bool, M = sel.sum(), row-major
    order as ``grid[sel]``) -> [B, N, D] grid with zeros elsewhere (differentiable)."""
    B, N = sel.shape
    flat = sel.reshape(-1).nonzero().squeeze(1)  # [M]
    out = rows.new_zeros(B * N, rows.shape[-1]).index_copy(0, flat, rows)  # [B * N, D]
    return out.view(B, N, -1)
