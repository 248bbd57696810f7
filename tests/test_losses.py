"""Tests for mimlab.nn.losses: every loss against a small hand-written reference."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mimlab.nn import losses as L

DT = torch.float64


def _rand(*shape, seed=0, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=DT).requires_grad_(requires_grad)


def _mask(B, N, seed=1):
    g = torch.Generator().manual_seed(seed)
    m = torch.rand(B, N, generator=g) < 0.5
    m[:, 0] = True  # at least one masked token per image
    m[:, 1] = False  # at least one visible token per image
    return m


# --------------------------------------------------------------------------------------
# masked_mean
# --------------------------------------------------------------------------------------
def test_masked_mean_reference_and_dtypes():
    x = _rand(3, 5)
    m = _mask(3, 5)
    ref = sum(x[b, n].item() for b in range(3) for n in range(5) if m[b, n]) / m.sum().item()
    for mask in (m, m.long(), m.to(DT)):
        assert L.masked_mean(x, mask).item() == pytest.approx(ref, rel=1e-12)
    assert L.masked_mean(x, None).item() == pytest.approx(x.mean().item(), rel=1e-12)
    w = torch.rand(3, 5, dtype=DT)
    assert L.masked_mean(x, w).item() == pytest.approx(((x * w).sum() / w.sum()).item(), rel=1e-12)


def test_masked_mean_empty_mask_is_zero_with_graph():
    x = _rand(2, 4, requires_grad=True)
    out = L.masked_mean(x, torch.zeros(2, 4, dtype=torch.bool))
    assert out.item() == 0.0 and out.requires_grad
    out.backward()
    assert torch.equal(x.grad, torch.zeros_like(x))


def test_masked_mean_ignores_nonfinite_unmasked():
    x = _rand(2, 4)
    m = _mask(2, 4)
    y = x.clone()
    y[~m] = float("nan")
    assert L.masked_mean(y, m).item() == pytest.approx(L.masked_mean(x, m).item(), rel=1e-12)


def test_masked_mean_shape_mismatch():
    with pytest.raises(ValueError):
        L.masked_mean(_rand(2, 4), torch.ones(2, 5))


# --------------------------------------------------------------------------------------
# regression_loss
# --------------------------------------------------------------------------------------
def _ref_smooth_l1(d, beta):
    a = abs(d)
    return 0.5 * a * a / beta if a < beta else a - 0.5 * beta


def _ref_regression(pred, target, mask, kind, beta=2.0):
    p, t = pred.detach().numpy(), target.detach().numpy()
    B, N, D = p.shape
    tot, cnt = 0.0, 0
    for b in range(B):
        for n in range(N):
            if mask is not None and not mask[b, n]:
                continue
            if kind == "l2":
                v = sum((p[b, n, d] - t[b, n, d]) ** 2 for d in range(D)) / D
            elif kind == "l1":
                v = sum(abs(p[b, n, d] - t[b, n, d]) for d in range(D)) / D
            elif kind == "smooth_l1":
                v = sum(_ref_smooth_l1(p[b, n, d] - t[b, n, d], beta) for d in range(D)) / D
            else:
                v = 1 - np.dot(p[b, n], t[b, n]) / (
                    np.linalg.norm(p[b, n]) * np.linalg.norm(t[b, n])
                )
            tot += v
            cnt += 1
    return tot / cnt


@pytest.mark.parametrize("kind", ["l2", "l1", "smooth_l1", "cosine"])
@pytest.mark.parametrize("use_mask", [True, False])
def test_regression_loss_reference(kind, use_mask):
    pred, target = _rand(2, 5, 4, seed=0) * 2, _rand(2, 5, 4, seed=3) * 2
    mask = _mask(2, 5) if use_mask else None
    out = L.regression_loss(pred, target, mask, kind=kind)
    assert out.ndim == 0
    assert out.item() == pytest.approx(_ref_regression(pred, target, mask, kind), rel=1e-10)


def test_smooth_l1_beta_both_branches():
    pred = torch.tensor([[[0.5, 3.0, -1.0, -4.0]]], dtype=DT)
    target = torch.zeros_like(pred)
    # beta=2: 0.5*0.25/2, 3-1, 0.5*1/2, 4-1 -> mean
    expect = (0.0625 + 2.0 + 0.25 + 3.0) / 4
    assert L.regression_loss(pred, target, kind="smooth_l1", beta=2.0).item() == pytest.approx(
        expect
    )
    assert L.regression_loss(pred, target, kind="smooth_l1", beta=1.0).item() == pytest.approx(
        F.smooth_l1_loss(pred, target, beta=1.0).item()
    )


@pytest.mark.parametrize("kind", ["l2", "l1", "smooth_l1", "cosine"])
def test_regression_loss_ignores_unmasked_and_grads(kind):
    pred = _rand(2, 6, 3, requires_grad=True)
    target = _rand(2, 6, 3, seed=5)
    m = _mask(2, 6)
    out = L.regression_loss(pred, target, m, kind=kind)
    changed = pred.detach().clone()
    changed[~m] += 10.0
    assert L.regression_loss(changed, target, m, kind=kind).item() == pytest.approx(
        out.item(), rel=1e-12
    )
    out.backward()
    assert torch.isfinite(pred.grad).all()
    assert pred.grad[m].abs().sum() > 0
    assert torch.equal(pred.grad[~m], torch.zeros_like(pred.grad[~m]))


def test_regression_loss_bad_args():
    with pytest.raises(ValueError):
        L.regression_loss(_rand(1, 2, 3), _rand(1, 2, 3), kind="huber")
    with pytest.raises(ValueError):
        L.regression_loss(_rand(1, 2, 3), _rand(1, 2, 4))


# --------------------------------------------------------------------------------------
# InfoNCE family
# --------------------------------------------------------------------------------------
def _ref_info_nce(q, k, T):
    q, k = q.detach().numpy(), k.detach().numpy()
    M = q.shape[0]
    tot = 0.0
    for i in range(M):
        s = [
            np.dot(q[i], k[j]) / (np.linalg.norm(q[i]) * np.linalg.norm(k[j])) / T for j in range(M)
        ]
        tot += -(s[i] - math.log(sum(math.exp(v) for v in s)))
    return tot / M


def test_info_nce_reference_and_cross_entropy():
    q, k = _rand(6, 4, seed=0), _rand(6, 4, seed=1)
    out = L.info_nce(q, k, temperature=0.2)
    assert out.item() == pytest.approx(_ref_info_nce(q, k, 0.2), rel=1e-10)
    sim = torch.empty(6, 6, dtype=DT)
    for i in range(6):
        for j in range(6):
            sim[i, j] = (q[i] @ k[j]) / (q[i].norm() * k[j].norm())
    ce = F.cross_entropy(sim / 0.2, torch.arange(6))
    assert out.item() == pytest.approx(ce.item(), rel=1e-12)
    # scale invariance (cosine similarity) and instance_info_nce alias
    assert L.info_nce(3 * q, 0.5 * k, 0.2).item() == pytest.approx(out.item(), rel=1e-10)
    assert L.instance_info_nce(q, k, 0.2).item() == pytest.approx(out.item(), rel=1e-12)


def test_info_nce_grads():
    q, k = _rand(5, 3, requires_grad=True), _rand(5, 3, seed=2, requires_grad=True)
    L.info_nce(q, k).backward()
    assert q.grad.abs().sum() > 0 and k.grad.abs().sum() > 0


def test_info_nce_perfect_alignment_low_loss():
    q = torch.eye(4, dtype=DT)
    assert L.info_nce(q, q, temperature=0.05).item() < 1e-6


def _ref_token_nce(q, k, T, qmask, kmask, same):
    """Per-query reference: candidates are the keys (b', j) with kmask and same(b, i, b', j)."""
    q, k = q.detach().numpy(), k.detach().numpy()
    B, N = qmask.shape
    tot, cnt = 0.0, 0
    for b in range(B):
        for i in range(N):
            if not qmask[b, i]:
                continue

            def cos(bb, j, b=b, i=i):
                return (
                    np.dot(q[b, i], k[bb, j])
                    / (np.linalg.norm(q[b, i]) * np.linalg.norm(k[bb, j]))
                    / T
                )

            cands = [
                cos(bb, j)
                for bb in range(k.shape[0])
                for j in range(N)
                if kmask[bb, j] and same(b, i, bb, j)
            ]
            tot += -(cos(b, i) - math.log(sum(math.exp(v) for v in cands)))
            cnt += 1
    return tot / cnt


def test_token_info_nce_image_reference():
    B, N, D, T = 2, 5, 3, 0.3
    q, k = _rand(B, N, D, seed=0), _rand(B, N, D, seed=1)
    m = _mask(B, N)
    same_image = lambda b, i, bb, j: bb == b  # noqa: E731
    out = L.token_info_nce(q, k, m, temperature=T, negatives="image")
    # candidates: the selected keys of the same image
    assert out.item() == pytest.approx(_ref_token_nce(q, k, T, m, m, same_image), rel=1e-10)
    every = torch.ones(B, N, dtype=torch.bool)
    all_keys = L.token_info_nce(q, k, m, temperature=T, negatives="image", key_mask=every)
    assert all_keys.item() == pytest.approx(
        _ref_token_nce(q, k, T, m, every, same_image), rel=1e-10
    )
    # unmasked: mean over every token = mean over images of per-image info_nce
    full = L.token_info_nce(q, k, None, temperature=T, negatives="image")
    per_img = sum(L.info_nce(q[b], k[b], T).item() for b in range(B)) / B
    assert full.item() == pytest.approx(per_img, rel=1e-10)


def test_token_info_nce_position_reference():
    B, N, D, T = 3, 4, 5, 0.2
    q, k = _rand(B, N, D, seed=0), _rand(B, N, D, seed=1)
    m = _mask(B, N)
    same_pos = lambda b, i, bb, j: j == i  # noqa: E731
    out = L.token_info_nce(q, k, m, temperature=T, negatives="position")
    assert out.item() == pytest.approx(_ref_token_nce(q, k, T, m, m, same_pos), rel=1e-10)
    # every token selected: the mean over positions of an instance-wise loss per position
    full = L.token_info_nce(q, k, None, temperature=T, negatives="position")
    per_pos = sum(L.instance_info_nce(q[:, i], k[:, i], T).item() for i in range(N)) / N
    assert full.item() == pytest.approx(per_pos, rel=1e-10)


@pytest.mark.parametrize("negatives", ["position", "image", "batch"])
def test_token_info_nce_with_keys_of_a_larger_batch(negatives):
    """Keys gathered from other processes: q's images are k[offset:offset + B]."""
    B, N, D, T = 2, 4, 3, 0.2
    qa, k = _rand(5, N, D, seed=0), _rand(5, N, D, seed=1)
    m = _mask(5, N)
    per_all = L.token_info_nce(qa, k, m, T, negatives, reduction="none")
    per_part = L.token_info_nce(
        qa[1 : 1 + B], k, m[1 : 1 + B], T, negatives, key_mask=m, key_offset=1, reduction="none"
    )
    assert torch.allclose(per_part, per_all[1 : 1 + B], rtol=1e-10)
    assert torch.equal(per_part[~m[1 : 1 + B]], torch.zeros_like(per_part[~m[1 : 1 + B]]))
    with pytest.raises(ValueError, match="key_mask"):
        L.token_info_nce(qa[:B], k, m[:B], T, negatives)
    inst = L.instance_info_nce(qa[1:3, 0], k[:, 0], T, key_offset=1, reduction="none")
    assert torch.allclose(
        inst,
        F.cross_entropy(
            F.normalize(qa[1:3, 0], dim=-1) @ F.normalize(k[:, 0], dim=-1).T / T,
            torch.tensor([1, 2]),
            reduction="none",
        ),
        rtol=1e-10,
    )


def test_batch_negatives_chunked_equal_the_unchunked_formula():
    """negatives='batch' is computed chunk by chunk (checkpointed in training): same value and
    gradients as info_nce on the flattened selected tokens (one [M, M] logits matrix)."""
    B, N, D, T = 3, 6, 4, 0.2
    q = _rand(B, N, D, seed=0, requires_grad=True)
    k = _rand(B, N, D, seed=1, requires_grad=True)
    m = _mask(B, N)
    ref = L.info_nce(q[m], k[m], T)
    gq, gk = torch.autograd.grad(ref, (q, k))
    for chunk in (1, 4, 1000):
        out = L.token_info_nce(q, k, m, T, "batch", chunk_size=chunk)
        cq, ck = torch.autograd.grad(out, (q, k))
        assert out.item() == pytest.approx(ref.item(), rel=1e-12)
        assert torch.allclose(cq, gq, rtol=1e-10, atol=1e-14)
        assert torch.allclose(ck, gk, rtol=1e-10, atol=1e-14)
    with pytest.raises(ValueError, match="chunk_size"):
        L.chunked_info_nce(q[0], k[0], torch.arange(N), T, chunk_size=0)


def test_token_info_nce_batch_reference():
    B, N, D, T = 2, 4, 3, 0.2
    q, k = _rand(B, N, D, seed=0), _rand(B, N, D, seed=1)
    m = _mask(B, N)
    out = L.token_info_nce(q, k, m, temperature=T, negatives="batch")
    assert out.item() == pytest.approx(_ref_info_nce(q[m], k[m], T), rel=1e-10)
    full = L.token_info_nce(q, k, None, temperature=T, negatives="batch")
    assert full.item() == pytest.approx(
        _ref_info_nce(q.reshape(-1, D), k.reshape(-1, D), T), rel=1e-10
    )


@pytest.mark.parametrize("negatives", ["position", "image", "batch"])
def test_token_info_nce_ignores_unmasked_queries_and_grads(negatives):
    q = _rand(2, 5, 3, requires_grad=True)
    k = _rand(2, 5, 3, seed=4)
    m = _mask(2, 5)
    out = L.token_info_nce(q, k, m, negatives=negatives)
    changed = q.detach().clone()
    changed[~m] = 7.0
    assert L.token_info_nce(changed, k, m, negatives=negatives).item() == pytest.approx(
        out.item(), rel=1e-12
    )
    out.backward()
    assert q.grad[m].abs().sum() > 0
    assert torch.equal(q.grad[~m], torch.zeros_like(q.grad[~m]))


@pytest.mark.parametrize("negatives", ["position", "image", "batch"])
def test_token_info_nce_empty_mask(negatives):
    q = _rand(2, 3, 4, requires_grad=True)
    out = L.token_info_nce(
        q, _rand(2, 3, 4, seed=1), torch.zeros(2, 3, dtype=torch.bool), negatives=negatives
    )
    assert out.item() == 0.0
    out.backward()
    assert torch.equal(q.grad, torch.zeros_like(q))


def test_token_info_nce_bad_negatives():
    with pytest.raises(ValueError):
        L.token_info_nce(_rand(1, 2, 3), _rand(1, 2, 3), negatives="queue")


# --------------------------------------------------------------------------------------
# BYOL
# --------------------------------------------------------------------------------------
def test_byol_loss_reference_masked_and_grads():
    p = _rand(2, 4, 3, requires_grad=True)
    z = _rand(2, 4, 3, seed=7)
    m = _mask(2, 4)
    pn, zn = p.detach().numpy(), z.numpy()
    vals = [
        2 - 2 * np.dot(pn[b, n], zn[b, n]) / (np.linalg.norm(pn[b, n]) * np.linalg.norm(zn[b, n]))
        for b in range(2)
        for n in range(4)
        if m[b, n]
    ]
    out = L.byol_loss(p, z, m)
    assert out.item() == pytest.approx(sum(vals) / len(vals), rel=1e-10)
    out.backward()
    assert torch.equal(p.grad[~m], torch.zeros_like(p.grad[~m]))
    x = _rand(3, 5)
    assert L.byol_loss(x, 2 * x).item() == pytest.approx(0.0, abs=1e-12)
    assert L.byol_loss(x, -x).item() == pytest.approx(4.0, rel=1e-12)


# --------------------------------------------------------------------------------------
# Target normalisations
# --------------------------------------------------------------------------------------
def test_layernorm_target_zero_mean_unit_var():
    t = _rand(2, 3, 16) * 5 + 3
    out = L.layernorm_target(t)
    assert torch.allclose(out.mean(-1), torch.zeros(2, 3, dtype=DT), atol=1e-12)
    assert torch.allclose(out.var(-1, unbiased=False), torch.ones(2, 3, dtype=DT), atol=1e-6)
    tn = t.numpy()
    ref = (tn - tn.mean(-1, keepdims=True)) / np.sqrt(tn.var(-1, keepdims=True) + 1e-6)
    assert np.allclose(out.numpy(), ref, atol=1e-12)


def test_patch_norm_target_reference():
    t = _rand(2, 3, 8) * 2 + 1
    tn = t.numpy()
    ref = (tn - tn.mean(-1, keepdims=True)) / np.sqrt(tn.var(-1, keepdims=True) + 1e-6)
    assert np.allclose(L.patch_norm_target(t, unbiased=False).numpy(), ref, atol=1e-12)
    ref_u = (tn - tn.mean(-1, keepdims=True)) / np.sqrt(tn.var(-1, ddof=1, keepdims=True) + 1e-6)
    assert np.allclose(L.patch_norm_target(t).numpy(), ref_u, atol=1e-12)  # MAE's default


def test_instance_norm_tokens_reference():
    t = _rand(2, 5, 3) * 3 - 1
    tn = t.numpy()
    ref = (tn - tn.mean(1, keepdims=True)) / np.sqrt(tn.var(1, keepdims=True) + 1e-5)
    out = L.instance_norm_tokens(t)
    assert out.shape == t.shape
    assert np.allclose(out.numpy(), ref, atol=1e-12)


def test_normalisations_do_not_modify_input_and_grad():
    for fn in (L.layernorm_target, L.patch_norm_target, L.instance_norm_tokens):
        t = _rand(2, 4, 6, requires_grad=True)
        before = t.detach().clone()
        out = fn(t)
        (out * _rand(2, 4, 6, seed=9)).sum().backward()
        assert torch.equal(t.detach(), before)
        assert torch.isfinite(t.grad).all() and t.grad.abs().sum() > 0


# --------------------------------------------------------------------------------------
# autocast / half precision
# --------------------------------------------------------------------------------------
def test_losses_under_autocast_bfloat16():
    g = torch.Generator().manual_seed(0)
    lin = torch.nn.Linear(8, 8)
    x = torch.randn(2, 6, 8, generator=g)
    y = torch.randn(2, 6, 8, generator=g)
    m = _mask(2, 6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        h = lin(x)
        outs = [L.regression_loss(h, y, m, kind=k) for k in ("l2", "l1", "smooth_l1", "cosine")] + [
            L.token_info_nce(h, y, m, negatives="image"),
            L.token_info_nce(h, y, m, negatives="batch"),
            L.token_info_nce(h, y, m, negatives="position"),
            L.instance_info_nce(h.mean(1), y.mean(1)),
            L.byol_loss(h, y, m),
            L.regression_loss(h, L.layernorm_target(y), m),
            L.regression_loss(h, L.patch_norm_target(y), m),
            L.regression_loss(h, L.instance_norm_tokens(y), m),
        ]
    ref_h = lin(x)
    refs = [L.regression_loss(ref_h, y, m, kind=k) for k in ("l2", "l1", "smooth_l1", "cosine")]
    total = sum(outs)
    assert all(o.dtype == torch.float32 and o.ndim == 0 and torch.isfinite(o) for o in outs)
    for o, r in zip(outs, refs):
        assert o.item() == pytest.approx(r.item(), rel=0.05, abs=0.02)
    total.backward()
    assert torch.isfinite(lin.weight.grad).all() and lin.weight.grad.abs().sum() > 0
