"""Block masking after the rewrite (NumPy bookkeeping, same random draws) equals the original
per-sample tensor loop bitwise for the same seed, and leaves the RNG in the same state (so
the golden values of data2vec / MaskDistill / SimMIM-block / MaskFeat cannot move)."""

import math

import pytest
import torch

from mimlab.nn.ops import block_masking


def _reference(batch, grid, mask_ratio, generator=None, min_block=4, max_aspect=3.0):
    """The implementation before the rewrite, verbatim (commit 0fe2c0e, mimlab/nn/ops.py)."""
    h, w = grid
    N = h * w
    target = int(round(mask_ratio * N))
    out = torch.zeros(batch, N)
    g = generator
    for b in range(batch):
        m = torch.zeros(h, w, dtype=torch.bool)
        tries = 0
        while int(m.sum()) < target and tries < 100:
            tries += 1
            remaining = target - int(m.sum())
            area = float(torch.empty(1).uniform_(min_block, max(min_block, remaining), generator=g))
            log_r = torch.empty(1).uniform_(
                -math.log(max_aspect), math.log(max_aspect), generator=g
            )
            ar = math.exp(float(log_r))
            bh = int(round(math.sqrt(area * ar)))
            bw = int(round(math.sqrt(area / ar)))
            if bh < 1 or bw < 1 or bh > h or bw > w:
                continue
            top = int(torch.randint(0, h - bh + 1, (1,), generator=g))
            left = int(torch.randint(0, w - bw + 1, (1,), generator=g))
            m[top : top + bh, left : left + bw] = True
        flat = m.flatten()
        cnt = int(flat.sum())
        if cnt > target:
            on = flat.nonzero().flatten()
            drop = on[torch.randperm(len(on), generator=g)[: cnt - target]]
            flat[drop] = False
        elif cnt < target:
            off = (~flat).nonzero().flatten()
            add = off[torch.randperm(len(off), generator=g)[: target - cnt]]
            flat[add] = True
        out[b] = flat.float()
    return out


@pytest.mark.parametrize(
    "grid,ratio", [((8, 8), 0.4), ((14, 14), 0.4), ((14, 14), 0.6), ((4, 4), 0.75), ((6, 9), 0.3)]
)
def test_same_masks_as_the_loop_for_the_same_seed(grid, ratio):
    for seed in range(20):
        a = _reference(8, grid, ratio, torch.Generator().manual_seed(seed))
        b = block_masking(8, grid, ratio, torch.Generator().manual_seed(seed))
        assert b.dtype == a.dtype and torch.equal(a, b), (grid, ratio, seed)


def test_global_rng_draws_unchanged():
    torch.manual_seed(3)
    a = _reference(16, (14, 14), 0.6)
    after_a = torch.rand(4)
    torch.manual_seed(3)
    b = block_masking(16, (14, 14), 0.6)
    after_b = torch.rand(4)
    assert torch.equal(a, b) and torch.equal(after_a, after_b)
