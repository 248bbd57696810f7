"""Methods are compile-ready (issue 24, item 3): the randomness of a step lives in
``Method.sample_inputs`` (the engine's batch step), ``forward`` is a pure function of its
inputs, and the parts ``run.compile=blocks`` compiles trace without graph breaks."""

from __future__ import annotations

import pytest
import torch
from timm.models.vision_transformer import Block

from mimlab.core.config import PretrainConfig, resolve
from mimlab.core.registry import PRESETS
from mimlab.methods import build_method
from mimlab.methods.base import encode
from mimlab.nn.models import compile_blocks


def _method(name: str, *ov: str):
    small_teacher = (
        ["method.teacher_size=64"] if PRESETS[name].values.get("target") == "teacher" else []
    )
    cfg = resolve(
        PretrainConfig, overrides=["model.preset=micro", f"method.name={name}", *small_teacher, *ov]
    )
    torch.manual_seed(0)
    return build_method(cfg, [0.5] * 3, [0.25] * 3).train()


def _images(B: int = 4, seed: int = 0) -> torch.Tensor:
    return torch.randn(B, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def _breaks(fn, *args, **kw):
    torch._dynamo.reset()
    ex = torch._dynamo.explain(fn)(*args, **kw)
    return ex.graph_break_count, [str(r.reason) for r in ex.break_reasons]


def _blocks(module) -> list:
    return [m for m in module.modules() if isinstance(m, Block)]


# ------------------------------------------------------------------ graph breaks
def test_mae_encoder_block_and_decoder_trace_without_graph_breaks():
    m = _method("mae")
    inputs = m.sample_inputs(_images(), torch.Generator().manual_seed(1))
    e = encode(
        m.encoder,
        inputs["images"],
        inputs["mask"],
        "drop",
        (inputs["ids_keep"], inputs["ids_restore"]),
    )
    # the parts run.compile=blocks compiles: one encoder and one decoder block
    assert _breaks(m.encoder.blocks[0], e.tokens) == (0, [])
    latent = m.head.decoder_embed(e.tokens)
    assert _breaks(m.head.blocks[0], latent) == (0, [])
    # and, more than is compiled: the whole encoder (token drop) and the whole decoder
    assert (
        _breaks(m.encoder.forward_features, inputs["images"], ids_keep=inputs["ids_keep"])[0] == 0
    )
    assert _breaks(m.head, e.tokens, inputs["ids_restore"])[0] == 0


def test_cmae_encoder_blocks_and_heads_trace_without_graph_breaks():
    m = _method("cmae")
    inputs = m.sample_inputs(_images(), torch.Generator().manual_seed(1))
    tokens = m.encoder.forward_features(inputs["x1"], mask=inputs["mask1"])
    assert _breaks(m.encoder.blocks[0], tokens) == (0, [])
    assert _breaks(m.target_encoder.blocks[0], tokens) == (0, [])
    assert _breaks(m.encoder.forward_features, inputs["x1"], mask=inputs["mask1"])[0] == 0
    z = tokens[:, 1:].flatten(0, 1)
    assert _breaks(lambda x: m.predictor(m.projector(x)), z)[0] == 0


@pytest.mark.parametrize("name", ["mae", "cmae", "rmae", "simmim", "data2vec"])
def test_whole_forward_traces_in_one_graph_given_its_inputs(name):
    """Beyond the blocks: given the drawn inputs, the whole training forward (loss included)
    is one graph for these presets (no host read, no data-dependent shape)."""
    m = _method(name)
    inputs = m.sample_inputs(_images(), torch.Generator().manual_seed(1))
    n, reasons = _breaks(m, **inputs)
    assert n == 0, reasons


def test_compile_blocks_compiles_every_block_in_place_and_keeps_the_loss():
    m = _method("mae")
    names = [n for n, _ in m.named_parameters()]
    inputs = m.sample_inputs(_images(), torch.Generator().manual_seed(1))
    eager = m(**inputs)["loss"]
    torch._dynamo.reset()
    n = compile_blocks(m, backend="eager")
    assert n == len(_blocks(m)) == m.encoder.depth + len(m.head.blocks)
    assert [n for n, _ in m.named_parameters()] == names  # checkpoints unchanged
    out = m(**inputs)["loss"]
    out.backward()
    assert torch.allclose(out, eager, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_engine_trains_with_run_compile_blocks(cifar_dir, tmp_path):
    from conftest import micro_pretrain_cfg

    from mimlab import tasks

    torch._dynamo.reset()
    cfg = micro_pretrain_cfg(cifar_dir, tmp_path, "run", "optim.epochs=1", "run.compile=blocks")
    res = tasks.pretrain(cfg)
    assert res["steps"] > 0 and res["final_loss"] is not None and res["final_loss"] > 0


# ------------------------------------------------------------------ determinism
@pytest.mark.parametrize("name", PRESETS)
def test_forward_is_a_pure_function_of_its_inputs(name):
    """Every preset: two forwards on the same drawn inputs give identical outputs (nothing is
    drawn inside forward; state such as BatchNorm's running statistics does not feed back)."""
    m = _method(name)
    inputs = m.sample_inputs(_images(), torch.Generator().manual_seed(1))
    a, b = m(**inputs), m(**inputs)
    assert set(a) == set(b)
    for k in a:
        if torch.is_tensor(a[k]):
            assert torch.equal(a[k], b[k]), (name, k)
        else:
            assert a[k] == b[k], (name, k)
    assert torch.isfinite(a["loss"])


@pytest.mark.parametrize("name", PRESETS)
def test_batch_step_gives_the_same_tensors_for_the_same_seed(name):
    m = _method(name)
    x = _images()
    a = m.sample_inputs(x, torch.Generator().manual_seed(7))
    b = m.sample_inputs(x, torch.Generator().manual_seed(7))
    c = m.sample_inputs(x, torch.Generator().manual_seed(8))
    assert set(a) == set(b) and "images" in a
    for k in a:
        assert (a[k] is None and b[k] is None) or torch.equal(a[k], b[k]), (name, k)
    drawn = [k for k in a if torch.is_tensor(a[k]) and a[k] is not x]
    assert drawn, f"{name}: nothing drawn"
    assert any(not torch.equal(a[k], c[k]) for k in drawn), f"{name}: the seed changes nothing"


@pytest.mark.parametrize("name", ["mae", "cmae", "rmae", "data2vec"])
def test_batch_step_draws_from_the_given_generator_only(name):
    """The global RNG is not touched when a generator is given (the engine gives the device's
    default generator, which is the global one: seeded, checkpointed, resumable)."""
    m = _method(name)
    torch.manual_seed(123)
    before = torch.get_rng_state()
    m.sample_inputs(_images(), torch.Generator().manual_seed(7))
    assert torch.equal(torch.get_rng_state(), before)


def test_direct_call_draws_what_the_engine_would():
    """Called without inputs, forward draws them from the default generator in the same
    order as ``sample_inputs`` does: the same losses as the engine's two-stage call."""
    for name in ("mae", "cmae", "maskdistill"):
        m = _method(name)
        x = _images()
        torch.manual_seed(5)
        direct = m(x)["loss"]
        torch.manual_seed(5)
        staged = m(**m.sample_inputs(x, torch.default_generator))["loss"]
        assert torch.equal(direct, staged), name


# ------------------------------------------------------------------ fixed shapes
def test_masked_batchnorm_head_equals_the_head_on_the_selected_rows():
    """C-MAE's heads on every position with ``valid`` give, at the valid rows, what the heads
    gave on the boolean-indexed rows (BatchNorm statistics from the valid rows only), and the
    same running statistics."""
    from mimlab.methods.contrastive import MLPHead

    torch.manual_seed(0)
    head = MLPHead(8, 16, 8, "bn").train()
    ref = MLPHead(8, 16, 8, "bn").train()
    ref.load_state_dict(head.state_dict())
    x = torch.randn(40, 8)
    valid = torch.rand(40, generator=torch.Generator().manual_seed(1)) < 0.4
    out = head(x, valid)
    expect = ref(x[valid])
    assert out.shape == (40, 8)
    assert torch.allclose(out[valid], expect, atol=1e-5)
    assert torch.allclose(head.norm.running_mean, ref.norm.running_mean, atol=1e-6)
    assert torch.allclose(head.norm.running_var, ref.norm.running_var, atol=1e-5)


def test_cmae_removed_queries_loss_equals_boolean_indexing():
    """``queries=removed`` (a data-dependent subset of positions): the fixed-shape pair loss
    equals the loss of the heads run on the boolean-indexed tokens (the code it replaced)."""
    import torch.nn.functional as F

    from mimlab.methods.contrastive import query_positions

    m = _method("cmae", "method.queries=removed")
    inputs = m.sample_inputs(_images(), torch.Generator().manual_seed(2))
    on = encode(m.encoder, inputs["x1"], inputs["mask1"], "mask_token")
    with torch.no_grad():
        tg = encode(m.target_encoder, inputs["x2"], inputs["mask2"], "mask_token")
    loss, cos = m.pair_loss(on, tg, inputs["mask1"], inputs["mask2"])
    B, N = inputs["mask1"].shape
    sel = query_positions(inputs["mask1"], inputs["mask2"], "mask_token", B, N, "cpu", "removed")
    assert 0 < int(sel.sum()) < B * N
    hq = m.predictor(m.projector(on.grid(N)[sel]))
    with torch.no_grad():
        hk = m.target_projector(tg.grid(N)[sel])
    q = torch.zeros(B, N, hq.shape[-1]).index_put((sel,), hq)
    k = torch.zeros(B, N, hk.shape[-1]).index_put((sel,), hk)
    ref = m.token_terms(q, k, sel).sum() / sel.sum()
    ref_cos = F.cosine_similarity(hq, hk, dim=-1).mean()
    assert torch.allclose(loss, ref, atol=1e-5) and torch.allclose(cos, ref_cos, atol=1e-5)
