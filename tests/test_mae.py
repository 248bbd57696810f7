import torch

from mimlab.config import PretrainConfig, resolve
from mimlab.losses import regression_loss
from mimlab.methods import build_method
from mimlab.ops import patch_normalize, patchify


def _mae(**ov):
    cfg = resolve(PretrainConfig, overrides=["model.preset=micro"] +
                  [f"{k}={v}" for k, v in ov.items()])
    torch.manual_seed(0)
    return build_method(cfg), cfg


def test_mae_forward_backward_tiny():
    m, cfg = _mae()
    x = torch.randn(3, 3, 32, 32)
    out = m(x)
    N = m.encoder.num_patches
    assert out["pred"].shape == (3, N, 8 * 8 * 3)
    assert out["mask"].shape == (3, N)
    assert torch.isfinite(out["loss"])
    out["loss"].backward()
    grads = {n: p.grad for n, p in m.named_parameters()}
    assert all(g is not None for g in grads.values()), [n for n, g in grads.items() if g is None]
    assert grads["encoder.blocks.0.attn.qkv.weight"].abs().sum() > 0
    assert m.encoder.mask_token is None  # MAE drops tokens: no mask token parameter


def test_noise_reproduces_masking_and_loss():
    m, _ = _mae()
    m.eval()
    x = torch.randn(2, 3, 32, 32)
    noise = torch.rand(2, m.encoder.num_patches)
    a, b = m(x, noise=noise), m(x, noise=noise)
    assert torch.equal(a["mask"], b["mask"]) and torch.equal(a["loss"], b["loss"])
    c = m(x, mask=a["mask"])  # the same masking given explicitly
    assert torch.allclose(c["loss"], a["loss"], atol=1e-6)


def test_loss_ignores_predictions_on_visible_patches():
    torch.manual_seed(0)
    pred, target = torch.randn(2, 16, 12), torch.randn(2, 16, 12)
    mask = (torch.rand(2, 16) > 0.5).float()
    base = regression_loss(pred, target, mask)
    pred2 = pred + 100 * (1 - mask)[..., None] * torch.randn_like(pred)
    assert torch.allclose(regression_loss(pred2, target, mask), base)
    # and it is exactly the MSE over removed patches
    ref = ((pred - target) ** 2).mean(-1)[mask.bool()].mean()
    assert torch.allclose(base, ref)


def test_norm_pix_target_is_per_patch_standardised():
    m, _ = _mae()
    x = torch.randn(2, 3, 32, 32) * 3 + 1
    out = m(x)
    t = patch_normalize(patchify(x, 8))
    assert torch.allclose(out["target"], t, atol=1e-5)
    assert torch.allclose(t.mean(-1), torch.zeros(2, 16), atol=1e-5)
    m2, _ = _mae(**{"method.norm_pix_loss": "false"})
    assert torch.allclose(m2(x)["target"], patchify(x, 8))


def test_mae_weight_init():
    m, _ = _mae()
    ln = m.encoder.norm
    assert torch.all(ln.weight == 1) and torch.all(ln.bias == 0)
    assert torch.all(m.encoder.blocks[0].attn.qkv.bias == 0)
    # xavier-uniform bound for the decoder prediction layer
    w = m.head.pred.weight
    bound = (6 / (w.shape[0] + w.shape[1])) ** 0.5
    assert w.abs().max() <= bound


def test_grad_checkpointing_gives_the_same_loss_and_gradients(monkeypatch):
    """model.grad_checkpointing recomputes block activations in backward: same loss and the
    same gradients as storing them, drop path included (its RNG state is replayed)."""
    import torch.utils.checkpoint as tuc
    calls = []
    real = tuc.checkpoint
    monkeypatch.setattr(tuc, "checkpoint", lambda *a, **k: calls.append(1) or real(*a, **k))
    grads = []
    for ckpt in (False, True):
        torch.manual_seed(0)
        cfg = resolve(PretrainConfig, overrides=["model.preset=micro", "model.drop_path=0.2",
                                                 f"model.grad_checkpointing={ckpt}"])
        m = build_method(cfg)
        m.train()
        assert m.encoder.grad_checkpointing is ckpt and m.head.grad_checkpointing is ckpt
        x = torch.randn(4, 3, cfg.model.img_size, cfg.model.img_size,
                        generator=torch.Generator().manual_seed(1))
        torch.manual_seed(2)
        loss = m(x)["loss"]
        loss.backward()
        grads.append((loss.detach(), {n: p.grad.clone() for n, p in m.named_parameters()
                                      if p.grad is not None}))
    (l0, g0), (l1, g1) = grads
    micro = resolve(PretrainConfig, overrides=["model.preset=micro"]).model
    assert len(calls) == micro.depth + micro.decoder_depth  # every block, only when enabled
    assert torch.equal(l0, l1)
    assert g0.keys() == g1.keys() and len(g0) > 10
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], rtol=1e-5, atol=1e-7, msg=n)
