"""The linear probe's lr choice: held-out training features only, and never at the grid's edge
while a step beyond it scores strictly better."""

from __future__ import annotations

import math

import pytest
import torch

import mimlab.nn.linear_probe as lin


def _fake_heads(peak: float, calls: list):
    """Stands in for ``train_linear_heads``: a head at lr ``lr`` gets the first
    ``80 - 10 |log10(lr / peak)|`` % of the held-out images right."""

    def fake(ftr, ytr, fte, nc, lrs, epochs, batch_size, weight_decay, seed):
        calls.append(list(lrs))
        n, out = len(fte), {}
        for lr in lrs:
            k = round(n * (0.8 - 0.1 * abs(math.log10(lr / peak))))
            logits = torch.zeros(n, nc)
            logits[torch.arange(n), torch.arange(n) % nc] = 1.0  # right on the first k
            logits[k:] = logits[k:].roll(1, dims=1)  # wrong on the rest
            out[lr] = logits
        return out

    return fake


@pytest.mark.parametrize(
    "peak, extend, want",
    [
        (3.0, 3, [0.003, 0.01, 0.03, 0.1, 0.3, 0.9, 2.7, 8.1]),  # up, until beyond the peak
        (100.0, 2, [0.003, 0.01, 0.03, 0.1, 0.3, 0.9, 2.7]),  # far up: at most `extend`
        (0.0001, 3, [0.000111111, 0.000333333, 0.001, 0.003, 0.01, 0.03, 0.1, 0.3]),  # down
        (0.03, 3, [0.003, 0.01, 0.03, 0.1, 0.3]),  # inside: the grid as given
        (3.0, 0, [0.003, 0.01, 0.03, 0.1, 0.3]),  # extension off
    ],
)
def test_choose_lr_extends_past_the_edge(monkeypatch, peak, extend, want):
    calls: list = []
    monkeypatch.setattr(lin, "train_linear_heads", _fake_heads(peak, calls))
    y = torch.arange(200) % 4
    f = torch.zeros(200, 3)
    acc = lin.choose_lr(f, y, f, y, 4, [0.3, 0.1, 0.03, 0.01, 0.003], 1, 32, extend=extend)
    assert sorted(acc) == pytest.approx(want)
    assert all(len(c) == 1 for c in calls[1:])  # each extension: one more head
    best = max(acc, key=acc.get)
    assert best == pytest.approx(min(want, key=lambda lr: abs(math.log10(lr / peak))))


def test_probe_on_separable_features_stops_at_a_tie():
    """Every lr separates these features perfectly: a tie at the edge extends nothing."""
    g = torch.Generator().manual_seed(0)
    y = torch.arange(300) % 3
    f = torch.randn(300, 8, generator=g) + 6 * torch.nn.functional.one_hot(y, 8).float()
    acc = lin.choose_lr(f[:240], y[:240], f[240:], y[240:], 3, [0.3, 0.1, 0.03], 5, 64, extend=3)
    assert sorted(acc) == [0.03, 0.1, 0.3] and set(acc.values()) == {100.0}
    top1, lr = lin.probe_top1(f, y, f, y, 3, [0.3, 0.1, 0.03], 5, 64, extend=3)
    assert top1 == 100.0 and lr in (0.3, 0.1, 0.03)
