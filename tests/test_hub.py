"""Export to the Hub formats (mimlab.io.hub, ``mimlab export``): the reference libraries load
the files and reproduce mimlab's outputs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import timm
import torch

from mimlab.cli import run
from mimlab.core.config import PretrainConfig, from_dict
from mimlab.io import checkpoint as ckf
from mimlab.io.export import export_checkpoint
from mimlab.io.sources import SourceError, load_encoder
from mimlab.methods import build_method

transformers = pytest.importorskip("transformers")

FIX = Path(__file__).parent / "fixtures"
PRE = str(FIX / "legacy_mae_micro_pretrain.pt")  # a mimlab MAE pretraining (micro, width 16)
FT = str(FIX / "legacy_micro_finetune.pt")  # fine-tuned from it (10-class head)
TOL = 1e-5


def _mimlab_method(path: str):
    """The MAE method exactly as training builds it, with the checkpoint's weights."""
    ck = ckf.load(path)
    method = build_method(from_dict(PretrainConfig, ck["config"]))
    method.load_state_dict(ck["model"])
    return method.eval()


def test_mae_pretrain_as_transformers_vitmae(tmp_path):
    info = export_checkpoint(PRE, tmp_path / "hf", fmt="hf")
    assert info["architecture"] == "ViTMAEForPreTraining"
    hf = transformers.ViTMAEForPreTraining.from_pretrained(tmp_path / "hf").eval()
    assert hf.config.norm_pix_loss is True and hf.config.mask_ratio == 0.75
    ours = _mimlab_method(PRE)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(4, 3, 32, 32, generator=g)
    noise = torch.rand(4, 16, generator=g)
    with torch.no_grad():
        ref = hf(pixel_values=x, noise=noise)
        out = ours(x, noise=noise)
    assert torch.equal(out["mask"], ref.mask)
    assert (out["pred"] - ref.logits).abs().max() < TOL
    assert abs(float(out["loss"]) - float(ref.loss)) < TOL
    # and back in through the hf: source
    back = load_encoder(f"hf:{tmp_path / 'hf'}")
    with torch.no_grad():
        assert (
            back.encoder.forward_features(x) - ours.encoder.forward_features(x)
        ).abs().max() < TOL


def test_encoder_and_finetuned_in_timm_hub_format(tmp_path):
    x = torch.randn(2, 3, 32, 32)
    info = export_checkpoint(PRE, tmp_path / "enc")  # default: timm directory
    assert info["format"] == "timm"
    assert {"model.safetensors", "config.json"} <= {p.name for p in (tmp_path / "enc").iterdir()}
    m = timm.create_model(f"local-dir:{tmp_path / 'enc'}", pretrained=True).eval()
    ours = load_encoder(PRE)
    with torch.no_grad():
        assert torch.equal(m.forward_features(x), ours.encoder.forward_features(x))
    export_checkpoint(FT, tmp_path / "ft")
    cfg = json.loads((tmp_path / "ft" / "config.json").read_text())
    assert cfg["num_classes"] == 10 and cfg["global_pool"] == "avg"
    m = timm.create_model(f"local-dir:{tmp_path / 'ft'}", pretrained=True).eval()
    ft = load_encoder(FT)
    with torch.no_grad():
        assert (m(x) - ft.logits(x)).abs().max() < TOL
    with pytest.raises(SourceError, match="no transformers ViT equivalent.*--format timm"):
        export_checkpoint(FT, tmp_path / "ft_hf", fmt="hf")


def test_cli_export_formats(tmp_path, capsys):
    assert run(["export", PRE, str(tmp_path / "e.pt")]) == 0  # the original .pt
    d = torch.load(tmp_path / "e.pt", weights_only=True)
    m = timm.create_model(d["timm_model"], pretrained=False, **d["timm_kwargs"])
    m.load_state_dict(d["state_dict"])
    assert run(["export", PRE, str(tmp_path / "h"), "--format", "hf"]) == 0
    assert json.loads((tmp_path / "h" / "config.json").read_text())["model_type"] == "vit_mae"
    capsys.readouterr()
    assert run(["export", "nope:x", str(tmp_path / "z")]) == 1
    assert "unknown model source 'nope:'" in capsys.readouterr().err
