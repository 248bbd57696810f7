"""Batch augmentations (mimlab.nn.augment): per-image colour jitter equal to torchvision's maths,
cutmix boxes, random resized crops."""

import pytest
import torch
import torchvision.transforms.v2.functional as TF

from mimlab.nn import augment as A

MEAN, STD = [0.4, 0.5, 0.6], [0.2, 0.25, 0.3]


@pytest.mark.parametrize("name", ["brightness", "contrast", "saturation", "hue"])
def test_per_image_colour_ops_match_torchvision(name):
    torch.manual_seed(0)
    px = torch.rand(4, 3, 8, 8)
    f = (
        torch.tensor([-0.1, 0.0, 0.05, 0.1])
        if name == "hue"
        else torch.tensor([0.6, 1.0, 1.3, 0.8])
    )
    mine = getattr(A, f"adjust_{name}")(px, f)
    ref = torch.stack([getattr(TF, f"adjust_{name}")(px[i], float(f[i])) for i in range(4)])
    assert torch.allclose(mine, ref, atol=2e-6)


def test_hsv_round_trip_and_grayscale():
    px = torch.rand(2, 3, 8, 8)
    assert torch.allclose(A.hsv_to_rgb(A.rgb_to_hsv(px)), px, atol=2e-6)
    assert torch.allclose(A.rgb_to_grayscale(px), TF.rgb_to_grayscale(px), atol=1e-7)


def test_jitter_identity_when_disabled_and_normalisation_round_trip():
    x = torch.randn(4, 3, 16, 16) * 0.5
    off = A.JitterSpec(p=0.0, grayscale_p=0.0)
    y = A.color_jitter_batch(x, MEAN, STD, off)
    # only the clamp to valid pixels [0, 1] changes anything
    ref = A.renormalize(A.denormalize(x, MEAN, STD), MEAN, STD)
    assert torch.allclose(y, ref, atol=1e-6)
    assert y.shape == x.shape and y.dtype == x.dtype


def test_jitter_is_per_image_and_stays_in_range():
    torch.manual_seed(0)
    x = torch.randn(1, 3, 16, 16).expand(8, -1, -1, -1).contiguous()  # 8 copies of one image
    y = A.color_jitter_batch(x, MEAN, STD)
    px = A.denormalize(y, MEAN, STD)
    assert px.min() >= 0 and px.max() <= 1
    assert torch.allclose(A.renormalize(px, MEAN, STD), y, atol=1e-5)  # no clipping left
    diffs = {round(float((y[i] - y[0]).abs().sum()), 3) for i in range(1, 8)}
    assert len(diffs) > 3  # different images got different parameters
    assert not torch.equal(x, y)


def test_grayscale_and_solarize():
    x = torch.randn(3, 3, 8, 8)
    y = A.color_jitter_batch(x, spec=A.JitterSpec(p=0.0, grayscale_p=1.0))
    px = A.denormalize(y)
    assert torch.allclose(px[:, 0], px[:, 1], atol=1e-6) and torch.allclose(
        px[:, 1], px[:, 2], atol=1e-6
    )
    s = A.jitter_pixels(
        torch.full((2, 3, 4, 4), 0.8), A.JitterSpec(p=0, grayscale_p=0, solarize_p=1.0)
    )
    assert torch.allclose(s, torch.full_like(s, 0.2))


def test_single_channel_jitter_runs():
    y = A.color_jitter_batch(torch.randn(4, 1, 8, 8), [0.3], [0.3])
    assert y.shape == (4, 1, 8, 8) and torch.isfinite(y).all()


def test_cutmix_pastes_a_box_of_the_neighbour():
    torch.manual_seed(0)
    x = torch.randn(6, 3, 16, 16)
    y, box = A.cutmix_batch(x, return_mask=True)
    src = x.roll(1, 0)
    assert torch.equal(torch.where(box, src, x), y)
    for b in range(6):  # the pasted region is one axis-aligned rectangle
        m = box[b, 0]
        if m.any():
            rows, cols = m.any(1).nonzero().flatten(), m.any(0).nonzero().flatten()
            assert m[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1].all()
            assert int(m.sum()) == len(rows) * len(cols)
    assert box.any() and not box.all()
    assert torch.equal(A.cutmix_batch(x[:1]), x[:1])  # a batch of one has nobody to mix with


def test_random_resized_crop_identity_flip_and_range():
    x = torch.randn(3, 3, 16, 16)
    same = A.random_resized_crop_batch(x, scale=(1, 1), ratio=(1, 1), hflip_p=0.0)
    assert torch.allclose(same, x, atol=1e-5)
    flip = A.random_resized_crop_batch(x, scale=(1, 1), ratio=(1, 1), hflip_p=1.0)
    assert torch.allclose(flip, x.flip(-1), atol=1e-5)
    torch.manual_seed(0)
    crop = A.random_resized_crop_batch(x, scale=(0.08, 0.3))
    assert crop.shape == x.shape
    assert crop.min() >= x.min() - 1e-5 and crop.max() <= x.max() + 1e-5  # bilinear: convex
    assert not torch.allclose(crop, x)


def test_contrast_mean_from_visible_pixels_only():
    torch.manual_seed(0)
    px = torch.rand(3, 3, 8, 8)
    f = torch.tensor([0.6, 1.0, 1.4])
    ones = torch.ones(3, 1, 8, 8)
    assert torch.allclose(A.adjust_contrast(px, f, ones), A.adjust_contrast(px, f), atol=1e-7)
    vis = torch.zeros(3, 1, 8, 8, dtype=torch.bool)
    vis[:, :, :4] = True
    changed = px.clone()
    changed[:, :, 4:] = 1.0 - changed[:, :, 4:]  # only hidden pixels change
    a, b = A.adjust_contrast(px, f, vis), A.adjust_contrast(changed, f, vis)
    assert torch.equal(a[:, :, :4], b[:, :, :4])
    assert not torch.allclose(
        A.adjust_contrast(px, f)[:, :, :4], A.adjust_contrast(changed, f)[:, :, :4]
    )
    # the blend target is the mean grey of the visible pixels
    gray = A.rgb_to_grayscale(px)[:, :, :4].mean((1, 2, 3)).view(3, 1, 1, 1)
    assert torch.allclose(
        a, (f.view(3, 1, 1, 1) * px + (1 - f.view(3, 1, 1, 1)) * gray).clamp(0, 1), atol=1e-6
    )


def test_patch_mask_to_pixels_and_random_partner():
    m = torch.tensor([[1.0, 0.0, 0.0, 1.0]])
    px = A.patch_mask_to_pixels(m, (4, 4))
    assert px.shape == (1, 1, 4, 4)
    assert px[0, 0].tolist() == [[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 1], [0, 0, 1, 1]]
    with pytest.raises(ValueError, match="square grid"):
        A.patch_mask_to_pixels(torch.ones(1, 3), (4, 4))
    torch.manual_seed(0)
    for B in (2, 3, 7):
        p = A.random_partner(B)
        assert sorted(p.tolist()) == list(range(B)) and not (p == torch.arange(B)).any()
    x = torch.arange(4).float().view(4, 1, 1, 1).expand(4, 1, 8, 8).contiguous()
    y, box = A.cutmix_batch(x, return_mask=True, partner=torch.tensor([2, 3, 0, 1]))
    assert torch.equal(y, torch.where(box, x[[2, 3, 0, 1]], x))
