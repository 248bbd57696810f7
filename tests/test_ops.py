import numpy as np
import pytest
import torch

from mimlab.nn.ops import (
    block_masking,
    gather_tokens,
    mask_to_ids,
    num_visible,
    patchify,
    random_masking,
    sincos_pos_embed_2d,
    unpatchify,
)


@pytest.mark.parametrize("ratio", [0.1, 0.5, 0.75, 0.9])
def test_random_masking_exact_visible_count(ratio):
    noise = torch.rand(7, 64)
    ids_keep, mask, ids_restore = random_masking(noise, ratio)
    K = int(64 * (1 - ratio))
    assert ids_keep.shape == (7, K)
    assert torch.all((1 - mask).sum(1) == K)
    # the kept ids are exactly the visible positions
    for b in range(7):
        vis = set(torch.nonzero(mask[b] == 0).flatten().tolist())
        assert vis == set(ids_keep[b].tolist())


def test_ids_restore_inverts_shuffle():
    noise = torch.rand(4, 16)
    ids_keep, mask, ids_restore = random_masking(noise, 0.75)
    ids_shuffle = torch.argsort(noise, dim=1)
    x = torch.randn(4, 16, 3)
    shuffled = gather_tokens(x, ids_shuffle)
    assert torch.equal(gather_tokens(shuffled, ids_restore), x)


def test_same_noise_same_mask_and_different_noise_differs():
    noise = torch.rand(3, 49, generator=torch.Generator().manual_seed(1))
    a = random_masking(noise, 0.75)
    b = random_masking(noise.clone(), 0.75)
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    c = random_masking(torch.rand(3, 49, generator=torch.Generator().manual_seed(2)), 0.75)
    assert not torch.equal(a[1], c[1])


def test_mask_to_ids_matches_random_masking():
    noise = torch.rand(5, 36)
    ids_keep, mask, _ = random_masking(noise, 0.5)
    k2, r2 = mask_to_ids(mask)
    assert torch.equal(torch.sort(k2, 1).values, torch.sort(ids_keep, 1).values)
    x = torch.randn(5, 36, 2)
    vis = gather_tokens(x, k2)
    full = torch.cat([vis, torch.zeros(5, 36 - vis.shape[1], 2)], 1)
    restored = gather_tokens(full, r2)
    assert torch.equal(restored * (1 - mask[..., None]), x * (1 - mask[..., None]))
    with pytest.raises(ValueError):
        mask_to_ids(torch.tensor([[1.0, 0.0], [1.0, 1.0]]))


def test_num_visible_bounds():
    assert num_visible(64, 0.75) == 16
    assert num_visible(4, 0.99) == 1
    with pytest.raises(ValueError):
        num_visible(64, 1.0)


@pytest.mark.parametrize("C,H,p", [(3, 32, 4), (1, 28, 7), (5, 16, 8)])
def test_patchify_roundtrip(C, H, p):
    x = torch.randn(2, C, H, H)
    t = patchify(x, p)
    assert t.shape == (2, (H // p) ** 2, p * p * C)
    assert torch.equal(unpatchify(t, p, (H // p, H // p), C), x)
    # first patch holds the top-left p x p pixels
    assert torch.equal(t[0, 0].view(p, p, C).permute(2, 0, 1), x[0, :, :p, :p])


def test_block_masking_exact_count_and_blocky():
    g = torch.Generator().manual_seed(0)
    m = block_masking(6, (8, 8), 0.4, generator=g)
    assert torch.all(m.sum(1) == round(0.4 * 64))
    # blocks: masked patches have masked neighbours far more often than random masks
    grid = m.view(6, 8, 8)
    nb = (grid[:, 1:, :] * grid[:, :-1, :]).sum() / grid[:, 1:, :].sum()
    assert nb > 0.5


def test_sincos_pos_embed():
    e = sincos_pos_embed_2d(16, (4, 4), cls_token=True)
    assert e.shape == (17, 16)
    assert np.all(e[0] == 0)
    assert np.unique(e[1:], axis=0).shape[0] == 16  # every position distinct
    with pytest.raises(ValueError):
        sincos_pos_embed_2d(10, (2, 2))
