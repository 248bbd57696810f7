"""Model sources (mimlab.io.sources) against the reference libraries, offline, random weights.

Each source model is built by its own library (transformers, timm) or written with the
official key names (facebookresearch/mae, MoCo v3), loaded through mimlab, and compared:
features, and where a decoder exists the MAE reconstructions and loss under the same noise."""

from __future__ import annotations

import logging

import pytest
import timm
import torch
from timm.models import register_model
from timm.models.vision_transformer import VisionTransformer

from mimlab.io import sources
from mimlab.io.sources import SourceError, load_encoder, parse_source
from mimlab.methods.masked import MaskedPrediction, PixelTarget

transformers = pytest.importorskip("transformers")

TOL = 1e-5
MICRO = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2)


def _vit(**kw):
    for k in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"):
        kw.pop(k, None)
    return VisionTransformer(**kw)


@register_model
def mimlab_test_vit_micro(pretrained=False, **kw):
    """timm ViT with a class token, token pooling and a 5-class head (test only)."""
    return _vit(**{**MICRO, "num_classes": 5, **kw})


@register_model
def mimlab_test_vit_gap(pretrained=False, **kw):
    """timm ViT with avg pooling + fc_norm, no class position, non-square 32x48 input."""
    return _vit(
        **{
            **MICRO,
            "img_size": (32, 48),
            "global_pool": "avg",
            "fc_norm": True,
            "no_embed_class": True,
            "num_classes": 0,
            **kw,
        }
    )


@register_model
def mimlab_test_vit_layerscale(pretrained=False, **kw):
    return _vit(**{**MICRO, "init_values": 0.1, **kw})


def _mae_out(m, x, noise):
    mp = MaskedPrediction(
        m.encoder,
        m.decoder,
        PixelTarget(m.encoder.patch_size),
        mask_ratio=m.mask_ratio,
        target_norm="patch" if m.norm_pix else "none",
    )
    with torch.no_grad():
        return mp.eval()(x, noise=noise)


def _hf_mae_config(**kw):
    return transformers.ViTMAEConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        image_size=32,
        patch_size=8,
        decoder_hidden_size=16,
        decoder_num_hidden_layers=1,
        decoder_num_attention_heads=2,
        decoder_intermediate_size=32,
        **kw,
    )


@pytest.fixture(scope="module")
def hf_mae(tmp_path_factory):
    torch.manual_seed(0)
    model = transformers.ViTMAEForPreTraining(_hf_mae_config(norm_pix_loss=True)).eval()
    d = tmp_path_factory.mktemp("hf_mae")
    model.save_pretrained(d)
    return model, d


# ----------------------------------------------------------------------------- parsing
def test_parse_forms():
    assert parse_source("runs/a/checkpoints/last.pt").kind == "mimlab"
    s = parse_source("timm:vit_base_patch16_224.mae@/w/model.safetensors")
    assert (s.kind, s.target, s.file) == (
        "timm",
        "vit_base_patch16_224.mae",
        "/w/model.safetensors",
    )
    assert parse_source("mae:/x.pth?heads=16&norm_pix=1").opt("heads") == "16"
    with pytest.raises(SourceError, match="unknown model source 'foo:'.*mae:PATH"):
        parse_source("foo:bar")


# ----------------------------------------------------------------------------- transformers
def test_hf_vitmae_features_reconstructions_and_loss(hf_mae, caplog):
    model, d = hf_mae
    with caplog.at_level(logging.INFO, logger="mimlab.sources"):
        m = load_encoder(f"hf:{d}")
    line = [r.message for r in caplog.records if r.name == "mimlab.sources"]
    assert len(line) == 1 and "MAE decoder" in line[0] and "pooling cls" in line[0]
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 3, 32, 32, generator=g)
    noise = torch.rand(3, 16, generator=g)
    with torch.no_grad():
        ref = model(pixel_values=x, noise=noise)
    out = _mae_out(m, x, noise)
    assert torch.equal(out["mask"], ref.mask)
    assert (out["pred"] - ref.logits).abs().max() < TOL
    assert abs(float(out["loss"]) - float(ref.loss)) < TOL
    # features of the whole image: HF with mask ratio 0 and the identity order
    model.config.mask_ratio = 0.0
    try:
        with torch.no_grad():
            full = model.vit(pixel_values=x, noise=torch.arange(16.0).expand(3, 16))
    finally:
        model.config.mask_ratio = 0.75
    with torch.no_grad():
        ours = m.encoder.forward_features(x)
    assert (ours - full.last_hidden_state).abs().max() < TOL


def test_hf_position_embeddings_are_interpolated_like_hf(hf_mae, caplog):
    model, d = hf_mae
    with caplog.at_level(logging.INFO, logger="mimlab.sources"):
        m = load_encoder(f"hf:{d}", img_size=48)
    assert "positions 4x4 -> 6x6 (bicubic)" in caplog.text
    x = torch.randn(2, 3, 48, 48)
    model.config.mask_ratio = 0.0
    try:
        with torch.no_grad():
            ref = model.vit(
                pixel_values=x,
                noise=torch.arange(36.0).expand(2, 36),
                interpolate_pos_encoding=True,
            ).last_hidden_state
    finally:
        model.config.mask_ratio = 0.75
    with torch.no_grad():
        assert (m.encoder.forward_features(x) - ref).abs().max() < TOL


def test_hf_vit_classifier_and_pooler(tmp_path, caplog):
    torch.manual_seed(0)
    cfg = transformers.ViTConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        image_size=32,
        patch_size=8,
        num_labels=4,
    )
    clf = transformers.ViTForImageClassification(cfg).eval()
    clf.save_pretrained(tmp_path / "clf")
    x = torch.randn(2, 3, 32, 32)
    m = load_encoder(f"hf:{tmp_path / 'clf'}")
    with torch.no_grad():
        assert (m.logits(x) - clf(pixel_values=x).logits).abs().max() < TOL
    base = transformers.ViTModel(cfg).eval()  # with the tanh pooler
    base.save_pretrained(tmp_path / "base")
    with caplog.at_level(logging.INFO, logger="mimlab.sources"):
        m = load_encoder(f"hf:{tmp_path / 'base'}")
    assert "not used: pooler" in caplog.text  # named, not silently dropped
    with torch.no_grad():
        ref = base(pixel_values=x).last_hidden_state
        assert (m.encoder.forward_features(x) - ref).abs().max() < TOL
        assert (m.features(x) - ref[:, 0]).abs().max() < TOL


@pytest.mark.parametrize("cls_name", ["BeitModel", "Data2VecVisionModel"])
def test_hf_unmappable_architectures_fail_in_one_line(tmp_path, cls_name):
    cfg_cls = getattr(transformers, cls_name.replace("Model", "Config"))
    model = getattr(transformers, cls_name)(
        cfg_cls(
            hidden_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=64,
            image_size=32,
            patch_size=8,
        )
    )
    model.save_pretrained(tmp_path)
    with pytest.raises(SourceError) as e:
        load_encoder(f"hf:{tmp_path}")
    msg = str(e.value)
    assert "\n" not in msg and "unsupported architecture" in msg
    assert any(
        w in msg
        for w in ("layer scale", "relative position bias", "no absolute position embeddings")
    )


def test_hf_hub_name_offline_says_how_to_pass_a_directory(monkeypatch):
    monkeypatch.setattr(sources, "try_to_load_from_cache", lambda *a, **k: None)
    with pytest.raises(SourceError, match="not in the Hugging Face cache.*pass hf:DIR"):
        load_encoder("hf:facebook/vit-mae-base")


# ----------------------------------------------------------------------------- timm
def test_timm_file_features_and_logits(tmp_path, caplog):
    torch.manual_seed(0)
    ref = timm.create_model("mimlab_test_vit_micro", pretrained=False).eval()
    torch.save(ref.state_dict(), tmp_path / "w.pth")
    with caplog.at_level(logging.INFO, logger="mimlab.sources"):
        m = load_encoder(f"timm:mimlab_test_vit_micro@{tmp_path / 'w.pth'}")
    assert "pooling cls" in caplog.text and "5-class head" in caplog.text
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert (m.encoder.forward_features(x) - ref.forward_features(x)).abs().max() < TOL
        assert (
            m.features(x) - ref.forward_head(ref.forward_features(x), pre_logits=True)
        ).abs().max() < TOL
        assert (m.logits(x) - ref(x)).abs().max() < TOL


def test_headless_timm_weights_load_for_features(tmp_path):
    """Weights saved with num_classes=0 under a name whose default has a head: no head is
    needed for features, so they load (issue 26)."""
    torch.manual_seed(0)
    ref = timm.create_model("mimlab_test_vit_micro", pretrained=False, num_classes=0).eval()
    torch.save(ref.state_dict(), tmp_path / "enc.pth")
    m = load_encoder(f"timm:mimlab_test_vit_micro@{tmp_path / 'enc.pth'}")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert (m.features(x) - ref(x)).abs().max() < TOL
    bad = {k: v for k, v in ref.state_dict().items() if k != "norm.weight"}
    torch.save(bad, tmp_path / "bad.pth")  # a missing encoder key is still an error
    with pytest.raises(SourceError, match="does not load into timm"):
        load_encoder(f"timm:mimlab_test_vit_micro@{tmp_path / 'bad.pth'}")


def test_timm_avg_pool_fc_norm_non_square_positions(tmp_path, caplog):
    torch.manual_seed(0)
    ref = timm.create_model("mimlab_test_vit_gap", pretrained=False).eval()
    torch.save(ref.state_dict(), tmp_path / "w.pth")
    with caplog.at_level(logging.INFO, logger="mimlab.sources"):
        m = load_encoder(f"timm:mimlab_test_vit_gap@{tmp_path / 'w.pth'}", img_size=32)
    assert (
        "pooling avg + fc_norm" in caplog.text and "positions 4x6 -> 4x4 (bicubic)" in caplog.text
    )
    # reference: timm itself on 32x32 inputs (dynamic_img_size resamples its positions)
    ref32 = timm.create_model("mimlab_test_vit_gap", pretrained=False, dynamic_img_size=True).eval()
    ref32.load_state_dict(ref.state_dict())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        want = ref32.forward_head(ref32.forward_features(x), pre_logits=True)
        assert (m.features(x) - want).abs().max() < TOL


def test_timm_unsupported_and_offline(tmp_path, monkeypatch):
    torch.manual_seed(0)
    ls = timm.create_model("mimlab_test_vit_layerscale", pretrained=False)
    torch.save(ls.state_dict(), tmp_path / "ls.pth")
    with pytest.raises(SourceError, match="unsupported architecture: layer scale"):
        load_encoder(f"timm:mimlab_test_vit_layerscale@{tmp_path / 'ls.pth'}")
    monkeypatch.setattr(sources, "try_to_load_from_cache", lambda *a, **k: None)
    with pytest.raises(SourceError, match=r"no local weights.*timm:vit_base_patch16_224\.mae@"):
        load_encoder("timm:vit_base_patch16_224.mae")


# ----------------------------------------------------------------------------- official MAE
def _hf_to_official_mae(sd: dict) -> dict:
    """transformers ViTMAEForPreTraining weights -> facebookresearch/mae ``models_mae`` names
    (the inverse of transformers' conversion script, written from the official layout)."""
    out = {}

    def block(prefix, i, hf_layer):
        q, k, v = (sd[f"{hf_layer}.attention.{n}_proj.weight"] for n in "qkv")
        out[f"{prefix}.{i}.attn.qkv.weight"] = torch.cat([q, k, v])
        out[f"{prefix}.{i}.attn.qkv.bias"] = torch.cat(
            [sd[f"{hf_layer}.attention.{n}_proj.bias"] for n in "qkv"]
        )
        for a, b in (
            ("attn.proj", "attention.o_proj"),
            ("norm1", "layernorm_before"),
            ("norm2", "layernorm_after"),
            ("mlp.fc1", "mlp.fc1"),
            ("mlp.fc2", "mlp.fc2"),
        ):
            for t in ("weight", "bias"):
                out[f"{prefix}.{i}.{a}.{t}"] = sd[f"{hf_layer}.{b}.{t}"]

    out["cls_token"] = sd["vit.embeddings.cls_token"]
    out["pos_embed"] = sd["vit.embeddings.position_embeddings"]
    for t in ("weight", "bias"):
        out[f"patch_embed.proj.{t}"] = sd[f"vit.embeddings.patch_embeddings.projection.{t}"]
        out[f"norm.{t}"] = sd[f"vit.layernorm.{t}"]
        out[f"decoder_embed.{t}"] = sd[f"decoder.decoder_embed.{t}"]
        out[f"decoder_norm.{t}"] = sd[f"decoder.decoder_norm.{t}"]
        out[f"decoder_pred.{t}"] = sd[f"decoder.decoder_pred.{t}"]
    out["mask_token"] = sd["decoder.mask_token"]
    out["decoder_pos_embed"] = sd["decoder.decoder_pos_embed"]
    n_enc = 1 + max(int(k.split(".")[2]) for k in sd if k.startswith("vit.layers."))
    n_dec = 1 + max(int(k.split(".")[2]) for k in sd if k.startswith("decoder.decoder_layers."))
    for i in range(n_enc):
        block("blocks", i, f"vit.layers.{i}")
    for i in range(n_dec):
        block("decoder_blocks", i, f"decoder.decoder_layers.{i}")
    return out


def test_official_mae_layout_with_decoder(tmp_path):
    torch.manual_seed(0)
    cfg = _hf_mae_config(layer_norm_eps=1e-6)  # official MAE: LayerNorm eps 1e-6
    hf = transformers.ViTMAEForPreTraining(cfg).eval()
    official = _hf_to_official_mae(hf.state_dict())
    fused = 4 * (cfg.num_hidden_layers + cfg.decoder_num_hidden_layers)  # q, k, v -> qkv
    assert len(official) == len(hf.state_dict()) - fused
    torch.save({"model": official}, tmp_path / "mae_visualize_micro.pth")
    m = load_encoder(f"mae:{tmp_path / 'mae_visualize_micro.pth'}?heads=2&dec_heads=2")
    assert m.decoder is not None and m.norm_pix is False
    x, noise = torch.randn(2, 3, 32, 32), torch.rand(2, 16)
    with torch.no_grad():
        ref = hf(pixel_values=x, noise=noise)
    out = _mae_out(m, x, noise)
    assert (out["pred"] - ref.logits).abs().max() < TOL
    assert abs(float(out["loss"]) - float(ref.loss)) < TOL
    # encoder-only file (the released mae_pretrain_vit_*.pth layout) against timm
    enc_only = {k: v for k, v in official.items() if not k.startswith(("decoder", "mask_token"))}
    torch.save({"model": enc_only}, tmp_path / "mae_pretrain_micro.pth")
    m = load_encoder(f"mae:{tmp_path / 'mae_pretrain_micro.pth'}?heads=2")
    assert m.decoder is None
    vit = VisionTransformer(**MICRO, mlp_ratio=2.0, num_classes=0).eval()
    vit.load_state_dict(enc_only)
    with torch.no_grad():
        assert (m.encoder.forward_features(x) - vit.forward_features(x)).abs().max() < TOL


def test_official_mae_needs_heads_and_rejects_unknown_keys(tmp_path):
    vit = VisionTransformer(**MICRO, num_classes=0)
    torch.save({"model": vit.state_dict()}, tmp_path / "a.pth")
    with pytest.raises(SourceError, match=r"add \?heads=N"):
        load_encoder(f"mae:{tmp_path / 'a.pth'}")
    torch.save({"model": {**vit.state_dict(), "extra.weight": torch.zeros(2)}}, tmp_path / "b.pth")
    with pytest.raises(SourceError, match="do not map.*extra.weight"):
        load_encoder(f"mae:{tmp_path / 'b.pth'}?heads=2")


# ----------------------------------------------------------------------------- MoCo v3
def test_mocov3_layout(tmp_path, caplog):
    torch.manual_seed(0)
    base = VisionTransformer(**MICRO, num_classes=0).eval()  # MoCo v3 ViTs are timm ViTs
    momentum = VisionTransformer(**MICRO, num_classes=0)
    sd = {f"module.base_encoder.{k}": v for k, v in base.state_dict().items()}
    sd.update({f"module.momentum_encoder.{k}": v for k, v in momentum.state_dict().items()})
    sd["module.base_encoder.head.0.weight"] = torch.zeros(64, 32)  # projector
    sd["module.predictor.0.weight"] = torch.zeros(64, 32)
    torch.save({"epoch": 300, "state_dict": sd, "optimizer": {}}, tmp_path / "moco.pth.tar")
    with caplog.at_level(logging.INFO, logger="mimlab.sources"):
        m = load_encoder(f"mocov3:{tmp_path / 'moco.pth.tar'}?heads=2")
    assert "not used: momentum encoder, predictor, projector" in caplog.text
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert (
            m.features(x) - base.forward_head(base.forward_features(x), pre_logits=True)
        ).abs().max() < TOL
    sd["module.something_else"] = torch.zeros(1)
    torch.save({"state_dict": sd}, tmp_path / "bad.pth.tar")
    with pytest.raises(SourceError, match="not in the MoCo v3 layout"):
        load_encoder(f"mocov3:{tmp_path / 'bad.pth.tar'}?heads=2")


# ----------------------------------------------------------------------------- CKA across sources
def test_cka_across_heterogeneous_sources(hf_mae, tmp_path, capsys):
    """One `analyze cka` run over a mimlab checkpoint, a transformers MAE, a timm ViT and a
    MoCo v3 file: each is normalised with its own statistics, all see the same masks."""
    import json
    import shutil

    from conftest import make_imagefolder

    from mimlab.cli import run

    hf_dir = tmp_path / "hf"
    shutil.copytree(hf_mae[1], hf_dir)
    (hf_dir / "preprocessor_config.json").write_text(
        json.dumps({"image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]})
    )
    torch.manual_seed(0)
    vit = timm.create_model("mimlab_test_vit_micro", pretrained=False)
    torch.save(vit.state_dict(), tmp_path / "vit.pth")
    base = VisionTransformer(**MICRO, num_classes=0)
    torch.save(
        {"state_dict": {f"module.base_encoder.{k}": v for k, v in base.state_dict().items()}},
        tmp_path / "moco.pth",
    )
    data = make_imagefolder(tmp_path / "data", classes=2, per_class=6)
    legacy = str(
        (__import__("pathlib").Path(__file__).parent / "fixtures" / "legacy_mae_micro_pretrain.pt")
    )
    rc = run(
        [
            "analyze",
            "cka",
            "--data",
            str(data),
            "--checkpoints",
            legacy,
            f"hf:{hf_dir}",
            f"timm:mimlab_test_vit_micro@{tmp_path / 'vit.pth'}",
            f"mocov3:{tmp_path / 'moco.pth'}?heads=2",
            "--ratios",
            "0.25",
            "0.5",
            "--images",
            "8",
            "--batch",
            "4",
            "--workers",
            "0",
            "--no-progress",
            "--out",
            str(tmp_path / "cka"),
        ]
    )
    assert rc == 0, capsys.readouterr().err
    res = json.loads((tmp_path / "cka" / "cka.json").read_text())
    kinds = [m["kind"] for m in res["models"]]
    assert kinds == ["mae", "hf", "timm", "mocov3"]
    assert res["models"][1]["mean"] == [0.5, 0.5, 0.5]  # hf: preprocessor_config
    assert res["models"][2]["mean"] == [0.485, 0.456, 0.406]  # timm's data config
    assert len(set(map(tuple, res["noise_digests"].values()))) == 1  # same masks for all
    for lab, per_ratio in res["cka"].items():
        assert all(0.0 <= v <= 1.0 + 1e-6 for vals in per_ratio.values() for v in vals)


def test_finetune_and_knn_from_foreign_sources(hf_mae, tiny_folder, tmp_path):
    """finetune / knn take any source: the architecture and the normalisation come with it."""
    from mimlab import tasks
    from mimlab.core.config import FinetuneConfig, ProbeConfig

    common = [
        f"data.path={tiny_folder}",
        "data.num_workers=0",
        "run.progress=false",
        f"run.out_dir={tmp_path}",
    ]
    ft = tasks.resolve_run_config(
        FinetuneConfig,
        overrides=common
        + [
            f"finetune.pretrained=hf:{hf_mae[1]}",
            "optim.batch_size=8",
            "optim.epochs=1",
            "run.max_steps=1",
            "run.name=ft",
        ],
    )
    res = tasks.finetune(ft)
    assert res["steps"] == 1
    assert ft.model.embed_dim == 32 and ft.model.patch_size == 8  # adopted
    assert ft.data.mean == [0.485, 0.456, 0.406]  # brought along
    base = VisionTransformer(**MICRO, num_classes=0)
    torch.save(
        {"state_dict": {f"module.base_encoder.{k}": v for k, v in base.state_dict().items()}},
        tmp_path / "moco.pth",
    )
    kc = tasks.resolve_run_config(
        ProbeConfig,
        overrides=common
        + [f"probe.pretrained=mocov3:{tmp_path / 'moco.pth'}?heads=2", "run.name=knn"],
    )
    res = tasks.knn(kc)
    assert 0.0 <= res["top1"] <= 100.0 and kc.model.num_heads == 2


def test_psnr_of_a_transformers_mae(hf_mae, tiny_folder, tmp_path):
    """`analyze psnr` reads an MAE with its decoder from a foreign source."""
    from mimlab.analysis.recon import analyze_psnr

    res = analyze_psnr(
        f"hf:{hf_mae[1]}",
        data=str(tiny_folder),
        images=4,
        batch=4,
        workers=0,
        out=str(tmp_path / "p.json"),
        progress=False,
    )
    assert res["images"] == 4 and res["mask_ratio"] == 0.75 and res["norm_pix"] is True
    assert res["data_mean"] == [0.485, 0.456, 0.406]
    assert 0.0 < res["psnr"] < 100.0
