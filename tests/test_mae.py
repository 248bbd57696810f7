import pytest
import torch

from mimlab.core.config import PretrainConfig, resolve
from mimlab.methods import build_method
from mimlab.nn.losses import patch_norm_target as patch_normalize
from mimlab.nn.losses import regression_loss
from mimlab.nn.ops import patchify


def _mae(**ov):
    cfg = resolve(
        PretrainConfig, overrides=["model.preset=micro"] + [f"{k}={v}" for k, v in ov.items()]
    )
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


class _CountOps:
    """Counts aten ops (by name) run while active, e.g. during backward."""

    def __init__(self):
        import collections

        from torch.utils._python_dispatch import TorchDispatchMode

        counts = self.counts = collections.Counter()

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                counts[func.overloadpacket.__name__] += 1
                return func(*args, **(kwargs or {}))

        self.mode = Mode()

    def __enter__(self):
        self.mode.__enter__()
        return self.counts

    def __exit__(self, *exc):
        return self.mode.__exit__(*exc)


def test_grad_checkpointing_gives_the_same_loss_and_gradients(monkeypatch):
    """model.grad_checkpointing (off | selective | full) recomputes block activations in
    backward: same loss and the same gradients as storing them, drop path included (its RNG
    state is replayed). selective recomputes LayerNorm and GELU but no matmul; full recomputes
    the matmuls too."""
    import torch.utils.checkpoint as tuc

    calls = []
    real = tuc.checkpoint
    monkeypatch.setattr(
        tuc, "checkpoint", lambda *a, **k: calls.append("context_fn" in k) or real(*a, **k)
    )
    runs = {}
    for mode in ("off", "selective", "full"):
        torch.manual_seed(0)
        cfg = resolve(
            PretrainConfig,
            overrides=[
                "model.preset=micro",
                "model.drop_path=0.2",
                f"model.grad_checkpointing={mode}",
            ],
        )
        m = build_method(cfg)
        m.train()
        assert m.encoder.grad_checkpointing == mode and m.head.grad_checkpointing == mode
        x = torch.randn(
            4, 3, cfg.model.img_size, cfg.model.img_size, generator=torch.Generator().manual_seed(1)
        )
        torch.manual_seed(2)
        loss = m(x)["loss"]
        with _CountOps() as backward_ops:
            loss.backward()
        runs[mode] = (
            loss.detach(),
            {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None},
            backward_ops,
        )
    micro = resolve(PretrainConfig, overrides=["model.preset=micro"]).model
    blocks = micro.depth + micro.decoder_depth
    # every block, only when enabled; selective passes its policy as context_fn
    assert calls == [True] * blocks + [False] * blocks
    l0, g0, ops0 = runs["off"]
    assert g0.keys() and len(g0) > 10
    for mode in ("selective", "full"):
        l1, g1, _ = runs[mode]
        assert torch.equal(l0, l1), mode
        assert g0.keys() == g1.keys(), mode
        for n in g0:
            torch.testing.assert_close(g1[n], g0[n], rtol=1e-5, atol=1e-7, msg=f"{mode}: {n}")
    sel, full = runs["selective"][2], runs["full"][2]
    # forward ops rerun in backward: GELU / LayerNorm under both modes, never without
    assert ops0["gelu"] == 0 and ops0["native_layer_norm"] == 0
    assert sel["gelu"] == full["gelu"] == blocks
    assert sel["native_layer_norm"] == full["native_layer_norm"] == 2 * blocks
    # matmuls: selective reruns none (same count as without checkpointing), full reruns them
    matmuls = lambda c: c["addmm"] + c["mm"]  # noqa: E731
    assert matmuls(sel) == matmuls(ops0)
    assert matmuls(full) > matmuls(ops0)
    assert sel["_scaled_dot_product_flash_attention_for_cpu"] == 0
    assert full["_scaled_dot_product_flash_attention_for_cpu"] == blocks


def test_grad_checkpointing_modes_in_config():
    """Booleans of older configs map to full / off; unknown modes fail with a hint."""
    from mimlab.core.config import ConfigError

    for given, want in (
        ("true", "full"),
        ("false", "off"),
        ("Selective", "selective"),
        ("off", "off"),
    ):
        cfg = resolve(PretrainConfig, overrides=[f"model.grad_checkpointing={given}"])
        assert cfg.model.grad_checkpointing == want
    with pytest.raises(ConfigError, match="did you mean 'selective'"):
        resolve(PretrainConfig, overrides=["model.grad_checkpointing=selectve"])
