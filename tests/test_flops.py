"""Analytic training FLOPs (mimlab/analysis/flops.py) against torch's FLOP counter, for every method
preset at the micro model (MAE also at mini), a few non-preset variants, the formulas of one
transformer block, compute-matched epochs and the ``mimlab flops`` command."""

from __future__ import annotations

import json

import pytest
import torch
from timm.models.vision_transformer import Block
from torch.utils.flop_counter import FlopCounterMode

from mimlab.analysis.flops import (
    ATTENTION_FORMULAS,
    BACKWARD_ATTENTION,
    attention_flops,
    block_flops,
    block_matmul_flops,
    compute_matched_epochs,
    measured_train_flops_per_image,
    preset_config,
    train_flops_per_image,
)
from mimlab.cli import run
from mimlab.core.config import METHOD_PRESETS, ConfigError

BATCH = 4


def _check(cfg) -> dict:
    """Analytic vs counted per image; a part counted by FlopCounterMode (frozen teacher) is
    left out of both sides, so only the derived parts are compared."""
    ana = train_flops_per_image(cfg, BATCH)
    counted = measured_train_flops_per_image(cfg, BATCH)
    by_counter = sum(ana[p] for p in ana["counted"])
    assert ana["total"] - by_counter > 0
    assert ana["total"] - by_counter == pytest.approx(counted - by_counter, rel=0.03)
    return ana


@pytest.mark.parametrize("method", list(METHOD_PRESETS))
def test_preset_matches_counter_micro(method):
    ana = _check(preset_config(method, "micro"))
    assert ana["total"] == pytest.approx(
        sum(ana[p] for p in ("encoder", "decoder", "heads", "target", "loss", "augment"))
    )
    if method == "maskdistill":  # EfficientNet-Lite0 teacher: counted, and said so
        assert ana["counted"] == ["target"] and ana["target"] > ana["encoder"]
    else:
        assert ana["counted"] == []


def test_mae_matches_counter_mini():
    ana = _check(preset_config("mae", "mini"))
    assert ana["decoder"] > 0 and ana["target"] == 0


@pytest.mark.parametrize(
    "method,overrides",
    [
        ("mae", ["model.grad_checkpointing=full"]),
        ("cmae", ["method.queries=removed"]),
        ("cmae", ["method.negatives=batch", "method.nce_chunk=8"]),
        ("cmae", ["method.symmetric=true", "method.negatives=image"]),
        ("mae", ["method.mask=none", "method.cutmix=true"]),
    ],
)
def test_variants_match_counter(method, overrides):
    _check(preset_config(method, "micro", overrides))


def test_block_formulas_match_counter():
    T, D = 17, 32
    blk = Block(D, 2, 4.0, qkv_bias=True)
    x = torch.randn(3, T, D, requires_grad=True)
    with FlopCounterMode(display=False, custom_mapping=ATTENTION_FORMULAS) as fc:
        y = blk(x)
    fwd = fc.get_total_flops() / 3
    assert fwd == block_flops(T, D) == 2 * T * (4 + 2 * 4) * D**2 + 4 * T**2 * D
    with FlopCounterMode(display=False, custom_mapping=ATTENTION_FORMULAS) as fc:
        y.sum().backward()
    bwd = fc.get_total_flops() / 3
    assert bwd == 2 * block_matmul_flops(T, D) + BACKWARD_ATTENTION * attention_flops(T, D)


def test_siamese_costs_more_than_mae_and_scales_with_tokens():
    mae = train_flops_per_image(preset_config("mae", "mini"))
    rmae = train_flops_per_image(preset_config("rmae", "mini"))
    # R-MAE: two encoder passes (16 + 48 visible of 64 patches) and two decoder passes
    assert rmae["encoder"] > 3 * mae["encoder"]
    assert rmae["decoder"] == pytest.approx(2 * mae["decoder"], rel=0.05)
    cmae = train_flops_per_image(preset_config("cmae", "mini"))
    assert cmae["target"] > 0 and cmae["heads"] > 0 and cmae["loss"] > 0


def test_compute_matched_epochs():
    assert compute_matched_epochs("mae", 20, "micro") == pytest.approx(20)
    f = {m: train_flops_per_image(preset_config(m, "micro"))["total"] for m in ("mae", "rmae")}
    got = compute_matched_epochs("rmae", 20, "micro")
    assert got == pytest.approx(20 * f["mae"] / f["rmae"]) and got < 20
    with pytest.raises(ConfigError, match="unknown method 'nope'"):
        compute_matched_epochs("nope", 20, "micro")


def test_cli_flops_table_and_json(tmp_path, capsys):
    out = tmp_path / "flops.json"
    assert (
        run(
            [
                "flops",
                "--preset",
                "micro",
                "--methods",
                "mae,simmim",
                "--batch",
                "4",
                "--json",
                str(out),
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "| simmim |" in printed and "x MAE" in printed
    doc = json.loads(out.read_text())
    rows = {r["method"]: r for r in doc["rows"]}
    assert set(rows) == {"mae", "simmim"} and doc["preset"] == "micro"
    assert rows["mae"]["relative_to_mae"] == pytest.approx(1.0)
    for r in rows.values():
        assert r["ratio"] == pytest.approx(1.0, rel=0.03)
        assert r["breakdown"]["total"] == r["analytic"]


def test_cli_flops_unknown_method(capsys):
    assert run(["flops", "--preset", "micro", "--methods", "mae,nope"]) == 2
    assert "unknown method 'nope'" in capsys.readouterr().err
