"""Reconstructions (mimlab/analysis/recon.py): de-normalising norm_pix predictions with the true
per-patch statistics (a leak for masked patches) or with statistics of the visible patches only
(no leak). Micro MAE (32 px, patch 8: N = 16 patches of 8*8*3 = 192 values)."""

import pytest
import torch

from mimlab.analysis.recon import (
    patch_stats,
    per_image_psnr,
    pred_to_patches,
    reconstruct,
    reconstruction_psnr,
    save_grid,
    visible_stats,
)
from mimlab.core.config import PretrainConfig, resolve
from mimlab.methods import build_method
from mimlab.nn.ops import patchify, random_masking, unpatchify

N, P = 16, 8
MEAN, STD = [0.5, 0.5, 0.5], [0.25, 0.25, 0.25]


def _mae(*ov):
    cfg = resolve(PretrainConfig, overrides=["model.preset=micro", "method.name=mae", *ov])
    torch.manual_seed(0)
    return build_method(cfg).eval()


def _mask(B=2, ratio=0.75, seed=1):
    g = torch.Generator().manual_seed(seed)
    return random_masking(torch.rand(B, N, generator=g), ratio)[1]


def test_visible_stats_hand_example():
    """3 patches of 4 values, the middle one masked: it gets the average of the visible
    patches' means (1 and 5 -> 3) and of their stds (unbiased: sqrt(var + eps))."""
    t = torch.tensor(
        [
            [
                [0.0, 0.0, 2.0, 2.0],  # mean 1, var 4/3
                [100.0, -50.0, 7.0, 9.0],  # masked: its values must not matter
                [5.0, 5.0, 5.0, 5.0],
            ]
        ]
    )  # mean 5, var 0
    mask = torch.tensor([[0.0, 1.0, 0.0]])
    eps = 1e-6
    mu, sd = visible_stats(t, mask, eps)
    s0, s2 = (4 / 3 + eps) ** 0.5, eps**0.5
    assert mu.shape == sd.shape == (1, 3, 1)
    assert torch.allclose(mu[0, :, 0], torch.tensor([1.0, 3.0, 5.0]))
    assert torch.allclose(sd[0, :, 0], torch.tensor([s0, (s0 + s2) / 2, s2]))
    # the true statistics of the masked patch are its own (the leak)
    tmu, tsd = patch_stats(t, eps)
    assert tmu[0, 1, 0] == pytest.approx(16.5)


def test_visible_stats_without_visible_patches_is_neutral():
    mu, sd = visible_stats(torch.randn(2, 4, 6), torch.ones(2, 4))
    assert torch.equal(mu, torch.zeros(2, 4, 1)) and torch.equal(sd, torch.ones(2, 4, 1))


def test_pred_to_patches_modes_and_errors():
    imgs = torch.randn(2, 3, 32, 32)
    pred, mask = torch.randn(2, N, P * P * 3), _mask()
    t = patchify(imgs, P)
    true = pred_to_patches(pred, imgs, P, True, stats="true")
    vis = pred_to_patches(pred, imgs, P, True, mask=mask, stats="visible")
    keep = mask == 0
    assert torch.allclose(true[keep], vis[keep])  # visible patches keep their own stats
    assert not torch.allclose(true[~keep], vis[~keep])
    # de-normalising a perfect prediction with the true statistics gives the patches back
    mu, sd = patch_stats(t)
    assert torch.allclose(pred_to_patches((t - mu) / sd, imgs, P, True), t, atol=1e-5)
    assert torch.equal(pred_to_patches(pred, imgs, P, False, mask=mask, stats="visible"), pred)
    with pytest.raises(ValueError, match="visible"):
        pred_to_patches(pred, imgs, P, True, stats="visible")
    with pytest.raises(ValueError, match="visible | true"):
        pred_to_patches(pred, imgs, P, True, mask=mask, stats="mean")


def test_no_leak_reconstruction_ignores_masked_pixels():
    """Change only the pixels of masked patches: the visible-stats reconstruction stays the same
    (the model sees visible patches only, and so do its statistics); the true-stats one moves
    because each masked patch gets its own (new) mean and std back."""
    m = _mae()
    x = torch.randn(2, 3, 32, 32)
    mask = _mask()
    t = patchify(x, P)
    g = torch.Generator().manual_seed(3)
    other = 3.0 * torch.randn(t.shape, generator=g) + 2.0  # new content, mean and contrast
    t2 = torch.where(mask.bool().unsqueeze(-1), other, t)
    x2 = unpatchify(t2, P, (4, 4), 3)
    a, b = reconstruct(m, x, mask=mask), reconstruct(m, x2, mask=mask)
    assert a["norm_pix"] and torch.equal(a["mask"], mask)
    for key in ("recon_visible_stats", "pasted_visible_stats", "masked"):
        assert torch.allclose(a[key], b[key], atol=1e-5), key
    for key in ("recon", "pasted"):
        assert (a[key] - b[key]).abs().max() > 0.5, key
    # PSNR: the two variants are reported side by side, the older names are the true-stats ones
    ps = reconstruction_psnr(a, MEAN, STD)
    assert ps["psnr"] == ps["psnr_true_stats"]
    assert ps["psnr_all_predicted"] == ps["psnr_all_predicted_true_stats"]
    assert ps["psnr_visible_stats"] != ps["psnr_true_stats"]
    per = per_image_psnr(a, MEAN, STD)
    assert set(per) == {
        "psnr_true_stats",
        "psnr_visible_stats",
        "psnr_all_predicted_true_stats",
        "psnr_all_predicted_visible_stats",
    } and per["psnr_true_stats"].shape == (2,)


def test_without_norm_pix_both_statistics_agree():
    m = _mae("method.target_norm=none", "method.norm_pix_loss=false")
    rec = reconstruct(m, torch.randn(2, 3, 32, 32), mask=_mask())
    assert not rec["norm_pix"]
    assert torch.equal(rec["recon"], rec["recon_visible_stats"])
    ps = reconstruction_psnr(rec, MEAN, STD)
    assert ps["psnr_true_stats"] == ps["psnr_visible_stats"]


def test_save_grid_stats_option(tmp_path):
    rec = reconstruct(_mae(), torch.randn(3, 3, 32, 32), mask=_mask(3))
    for stats in ("visible", "true"):
        path = save_grid(
            rec, MEAN, STD, tmp_path / f"{stats}.png", n=3, stats=stats, row_labels=["a", "b", "c"]
        )
        assert path.stat().st_size > 1000
    with pytest.raises(ValueError, match="stats"):
        save_grid(rec, MEAN, STD, tmp_path / "x.png", stats="leaky")
