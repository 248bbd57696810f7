"""Tests for mimlab.analysis.metrics: linear CKA, the mini-batch CKA accumulator and PSNR."""

import math

import numpy as np
import pytest
import torch

from mimlab.analysis.metrics import CKAAccumulator, linear_cka, psnr, psnr_from_mse, to_2d

DT = torch.float64


def _rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=DT)


def _np_cka(x, y):
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    x = x - x.mean(0)
    y = y - y.mean(0)
    return np.linalg.norm(y.T @ x) ** 2 / (np.linalg.norm(x.T @ x) * np.linalg.norm(y.T @ y))


def _orthogonal(d, seed):
    q, r = torch.linalg.qr(_rand(d, d, seed=seed))
    return q * torch.sign(torch.diagonal(r))


# --------------------------------------------------------------------------------------
# linear_cka
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("n,d1,d2", [(40, 6, 9), (5, 12, 7)])  # feature form and Gram form
def test_linear_cka_matches_numpy(n, d1, d2):
    x, y = _rand(n, d1, seed=0), _rand(n, d2, seed=1) + 0.3 * _rand(n, d1, seed=0)[:, :1]
    out = linear_cka(x, y)
    assert out.dtype == DT and out.ndim == 0
    assert out.item() == pytest.approx(_np_cka(x.numpy(), y.numpy()), rel=1e-10)
    assert 0.0 <= out.item() <= 1.0


def test_linear_cka_identity_and_invariances():
    x = _rand(30, 8, seed=0) + 2.0
    y = _rand(30, 5, seed=1)
    assert linear_cka(x, x).item() == pytest.approx(1.0, abs=1e-12)
    base = linear_cka(x, y).item()
    assert linear_cka(3.7 * x, y).item() == pytest.approx(base, rel=1e-10)
    assert linear_cka(x, 0.01 * y).item() == pytest.approx(base, rel=1e-10)
    q = _orthogonal(8, seed=5)
    assert linear_cka(x @ q, y).item() == pytest.approx(base, rel=1e-10)
    assert linear_cka(x, x @ q).item() == pytest.approx(1.0, abs=1e-10)
    # translation (centring) invariance
    assert linear_cka(x + 100.0, y - 5.0).item() == pytest.approx(base, rel=1e-9)
    # symmetric
    assert linear_cka(y, x).item() == pytest.approx(base, rel=1e-12)


def test_linear_cka_float32_input_and_no_grad():
    x = _rand(20, 4).float().requires_grad_(True)
    out = linear_cka(x, x * 2)
    assert out.dtype == DT and not out.requires_grad
    assert out.item() == pytest.approx(1.0, abs=1e-12)


def test_linear_cka_bad_shapes():
    with pytest.raises(ValueError):
        linear_cka(_rand(5, 3), _rand(6, 3))
    with pytest.raises(ValueError):
        linear_cka(_rand(5, 2, 3), _rand(5, 3))


def test_to_2d():
    t = _rand(4, 3, 5)
    assert torch.equal(to_2d(t, "mean_tokens"), t.mean(1))
    assert torch.equal(to_2d(t, "flatten"), t.reshape(4, 15))
    assert torch.equal(to_2d(t[:, 0]), t[:, 0])
    with pytest.raises(ValueError):
        to_2d(t, "max")


# --------------------------------------------------------------------------------------
# CKAAccumulator
# --------------------------------------------------------------------------------------
def test_accumulator_matches_full_batch_multiple_keys():
    n = 37
    x0, y0 = _rand(n, 6, seed=0) + 50.0, _rand(n, 4, seed=1) * 3
    y0 = y0 + 0.5 * x0[:, :4]
    x1, y1 = _rand(n, 3, seed=2), _rand(n, 5, seed=3) - 7.0
    acc = CKAAccumulator()
    for lo, hi in [(0, 5), (5, 6), (6, 20), (20, 37)]:
        acc.update(0, x0[lo:hi], y0[lo:hi])
        acc.update("b1", x1[lo:hi], y1[lo:hi])
    vals = acc.values()
    assert list(vals) == [0, "b1"]
    assert abs(vals[0].item() - linear_cka(x0, y0).item()) < 1e-8
    assert abs(vals["b1"].item() - linear_cka(x1, y1).item()) < 1e-8
    assert abs(vals[0].item() - _np_cka(x0.numpy(), y0.numpy())) < 1e-8
    assert acc.count(0) == n and len(acc) == 2
    assert acc.value("b1").item() == vals["b1"].item()


@pytest.mark.parametrize("reduce", ["mean_tokens", "flatten"])
def test_accumulator_token_inputs(reduce):
    n = 12
    x = _rand(n, 4, 3, seed=0)
    y = _rand(n, 2, 3, seed=1) + x[:, :2]  # different token counts
    acc = CKAAccumulator(reduce=reduce)
    for lo in range(0, n, 5):
        acc.update("k", x[lo : lo + 5], y[lo : lo + 5])
    expect = linear_cka(to_2d(x, reduce), to_2d(y, reduce))
    assert abs(acc.value().item() - expect.item()) < 1e-8


def test_accumulator_identical_is_one_and_errors():
    x = _rand(10, 3)
    acc = CKAAccumulator()
    acc.update(0, x[:4], x[:4])
    acc.update(0, x[4:], x[4:])
    assert acc.value(0).item() == pytest.approx(1.0, abs=1e-12)
    with pytest.raises(ValueError):
        acc.update(0, _rand(2, 4), _rand(2, 3))  # feature dim changed
    with pytest.raises(ValueError):
        acc.update(1, _rand(2, 3), _rand(3, 3))  # batch sizes differ
    with pytest.raises(KeyError):
        acc.value(99)
    with pytest.raises(ValueError):
        CKAAccumulator(reduce="sum")
    acc.reset()
    assert len(acc) == 0


# --------------------------------------------------------------------------------------
# PSNR
# --------------------------------------------------------------------------------------
def test_psnr_constant_offset_is_20db():
    a = torch.rand(3, 3, 8, 8, generator=torch.Generator().manual_seed(0), dtype=DT) * 0.8
    b = a + 0.1
    per = psnr(a, b, reduction="none")
    assert per.shape == (3,) and per.dtype == DT
    assert torch.allclose(per, torch.full((3,), 20.0, dtype=DT), atol=1e-9)
    assert psnr(a, b).item() == pytest.approx(20.0, abs=1e-9)
    # uint8-style range: offset 25.5 on range 255 -> also 20 dB
    assert psnr(a * 255, b * 255, data_range=255.0).item() == pytest.approx(20.0, abs=1e-9)


def test_psnr_identical_images_inf_and_mean():
    a = torch.rand(3, 1, 4, 4, generator=torch.Generator().manual_seed(1))
    assert torch.isinf(psnr(a, a.clone(), reduction="none")).all()
    assert psnr(a, a.clone()).item() == math.inf
    b = a.clone()
    b[1] = b[1] + 0.1  # only image 1 differs -> the mean ignores the two inf values
    per = psnr(a, b, reduction="none")
    assert math.isinf(per[0].item()) and math.isinf(per[2].item())
    assert psnr(a, b).item() == pytest.approx(per[1].item())
    assert per[1].item() == pytest.approx(20.0, abs=1e-4)  # float32 input


def test_psnr_reference_and_from_mse():
    a = torch.rand(2, 3, 5, 5, generator=torch.Generator().manual_seed(2), dtype=DT)
    b = torch.rand(2, 3, 5, 5, generator=torch.Generator().manual_seed(3), dtype=DT)
    an, bn = a.numpy(), b.numpy()
    ref = [10 * math.log10(1.0 / np.mean((an[i] - bn[i]) ** 2)) for i in range(2)]
    assert np.allclose(psnr(a, b, reduction="none").numpy(), ref, atol=1e-10)
    assert psnr(a, b).item() == pytest.approx(sum(ref) / 2, abs=1e-10)
    assert psnr_from_mse(0.01).item() == pytest.approx(20.0, abs=1e-12)
    assert psnr_from_mse(torch.tensor([1e-4, 0.0]), data_range=1.0).tolist() == [
        pytest.approx(40.0),
        math.inf,
    ]
    with pytest.raises(ValueError):
        psnr(a, b[:1])
    with pytest.raises(ValueError):
        psnr(a, b, reduction="sum")
