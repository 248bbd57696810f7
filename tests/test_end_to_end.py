"""Tiny pretrain -> fine-tune -> linear probe -> k-NN on a few hundred CIFAR-10 images, through
the CLI, plus export to timm."""

import json

import pytest
import timm
import torch

from mimlab.cli import run
from mimlab.core.config import ModelConfig, from_dict
from mimlab.io.export import export_checkpoint, to_timm
from mimlab.nn.models import build_encoder
from mimlab.tasks import Classifier, load_encoder_weights
from mimlab.train.engine import load_checkpoint


@pytest.fixture(scope="module")
def pipeline(cifar_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    common = [
        f"--data={cifar_dir}",
        f"--out={out}",
        "run.progress=false",
        "data.num_workers=0",
        "data.val_limit=100",
    ]
    assert (
        run(
            [
                "pretrain",
                *common,
                "--name=pre",
                "model.preset=micro",
                "data.limit=256",
                "optim.epochs=2",
                "optim.batch_size=32",
                "run.log_every=2",
            ]
        )
        == 0
    )
    ck = out / "pre/checkpoints/last.pt"
    assert (
        run(
            [
                "finetune",
                *common,
                "--name=ft",
                f"--pretrained={ck}",
                "data.limit=200",
                "optim.epochs=1",
                "optim.batch_size=20",
            ]
        )
        == 0
    )
    assert (
        run(
            [
                "finetune",
                *common,
                "--name=scratch",
                "model.preset=micro",
                "data.limit=200",
                "optim.epochs=1",
                "optim.batch_size=20",
                "finetune.mixup=0",
                "finetune.cutmix=0",
            ]
        )
        == 0
    )
    assert (
        run(
            [
                "linprobe",
                *common,
                "--name=lp",
                f"--pretrained={ck}",
                "data.limit=200",
                "probe.epochs=5",
            ]
        )
        == 0
    )
    assert (
        run(["knn", *common, "--name=knn", f"--pretrained={ck}", "data.limit=200", "probe.k=5"])
        == 0
    )
    return out


def _res(d):
    return json.loads((d / "results.json").read_text())


def test_pipeline_results(pipeline):
    pre = _res(pipeline / "pre")
    assert pre["steps"] == 16 and pre["final_loss"] > 0
    for name in ("ft", "scratch", "lp", "knn"):
        r = _res(pipeline / name)
        assert 0.0 <= r["top1"] <= 100.0, (name, r)
        assert r["val_images"] == 100
        assert (pipeline / name / "config.yaml").exists()
    assert _res(pipeline / "ft")["pretrained"].endswith("last.pt")
    assert _res(pipeline / "scratch")["pretrained"] is None
    lp = _res(pipeline / "lp")
    assert set(lp["test_top1_per_lr"]) == {"0.3", "0.1", "0.03", "0.01", "0.003"}
    assert lp["best_lr"] in [0.3, 0.1, 0.03, 0.01, 0.003]
    # fine-tuning started from the pretrained weights (architecture adopted from checkpoint)
    ft_cfg = (pipeline / "ft/config.yaml").read_text()
    assert "embed_dim: 32" in ft_cfg


def test_pretrained_weights_are_loaded_into_finetune(pipeline):
    pre = load_checkpoint(pipeline / "pre/checkpoints/last.pt")["model"]
    enc = build_encoder(
        from_dict(
            ModelConfig, load_checkpoint(pipeline / "pre/checkpoints/last.pt")["config"]["model"]
        ),
        mask_token=False,
    )
    load_encoder_weights(enc, str(pipeline / "pre/checkpoints/last.pt"))
    assert torch.equal(enc.blocks[0].attn.qkv.weight, pre["encoder.blocks.0.attn.qkv.weight"])


def test_timm_export_pretrained_features_match(pipeline, tmp_path):
    ck = pipeline / "pre/checkpoints/last.pt"
    model = to_timm(ck, num_classes=10)
    mc = from_dict(ModelConfig, load_checkpoint(ck)["config"]["model"])
    enc = build_encoder(mc, mask_token=False)
    load_encoder_weights(enc, str(ck))
    enc.eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(model.forward_features(x), enc.forward_features(x), atol=1e-5)
    # the file export loads into a plain timm.create_model with only the head missing
    info = export_checkpoint(ck, tmp_path / "enc.pt")
    d = torch.load(tmp_path / "enc.pt", weights_only=True)
    kw = dict(d["timm_kwargs"], num_classes=10)
    m2 = timm.create_model(d["timm_model"], pretrained=False, **kw)
    missing, unexpected = m2.load_state_dict(d["state_dict"], strict=False)
    assert set(missing) == {"head.weight", "head.bias"} and not unexpected
    assert info["timm_kwargs"]["embed_dim"] == 32


def test_timm_export_finetuned_logits_match(pipeline):
    ck = pipeline / "ft/checkpoints/last.pt"
    model = to_timm(ck)
    c = load_checkpoint(ck)
    mc = from_dict(ModelConfig, c["config"]["model"])
    clf = Classifier(build_encoder(mc, mask_token=False), 10)
    clf.load_state_dict(c["model"])
    clf.eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(model(x), clf.logits(x), atol=1e-5)


def test_wrong_architecture_checkpoint_fails_in_one_line(pipeline, cifar_dir, tmp_path, capsys):
    ck = pipeline / "pre/checkpoints/last.pt"
    rc = run(
        [
            "finetune",
            f"--data={cifar_dir}",
            f"--out={tmp_path}",
            f"--pretrained={ck}",
            "model.preset=micro",
            "model.embed_dim=64",
            "run.progress=false",
        ]
    )
    err = capsys.readouterr().err
    assert rc == 1 and "embed_dim=32" in err and "embed_dim=64" in err
    assert len(err.strip().splitlines()) == 1


def test_cli_help_documents_every_key(capsys):
    from mimlab.core.config import PretrainConfig, describe

    with pytest.raises(SystemExit):
        run(["pretrain", "--help"])
    out = capsys.readouterr().out
    for key, *_ in describe(PretrainConfig):
        assert key in out


def test_cli_config_error_is_one_line(capsys, tmp_path):
    assert run(["pretrain", "optim.epoch=3", f"--out={tmp_path}"]) == 2
    err = capsys.readouterr().err.strip()
    assert (
        err == "mimlab: config error: unknown config key 'optim.epoch' (did you mean "
        "'optim.epochs'?)"
    )


# ------------------------------------------------------------------------------------ demo
def test_demo_budget_plan_repeats_small_sets():
    from mimlab.demo import DEMO_STEPS, plan_budget

    # 10,000 CIFAR-10 images, batch 128: 78 steps per epoch, 5 epochs
    assert (
        plan_budget(10_000) == {"epochs": 5, "repeat": 1, "steps_per_epoch": 78, "steps": 390}
        and DEMO_STEPS == 390
    )
    # 7 photos: repeated 183x per epoch (1,281 images = 10 steps), 39 epochs
    assert plan_budget(7) == {"epochs": 39, "repeat": 183, "steps_per_epoch": 10, "steps": 390}
    assert plan_budget(7, epochs=2)["steps"] == 20
    with pytest.raises(ValueError, match="no images"):
        plan_budget(0)


def test_demo_rows_spread_over_classes():
    from mimlab.demo import _spread_over_classes

    labels = [0] * 5 + [1] * 5 + [2] * 5  # sorted by class, as an ImageFolder is
    rows = _spread_over_classes(labels, 4)
    assert [labels[i] for i in rows] == [0, 1, 2, 0] and rows == [0, 5, 10, 1]


DEMO_OV = ["optim.batch_size=8", "data.num_workers=0", "run.progress=false"]


def test_demo_on_seven_photos_repeats_the_set(tmp_path, capsys):
    """A folder of 7 images used to stop with 'smaller than one optimizer step'."""
    import numpy as np
    from PIL import Image

    from mimlab.demo import demo

    d = tmp_path / "photos"
    d.mkdir()
    rng = np.random.default_rng(0)
    for i in range(7):
        Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(d / f"{i}.png")
    res = demo(data=str(d), out=str(tmp_path / "runs"), preset="micro", steps=3, overrides=DEMO_OV)
    out = capsys.readouterr().out
    assert res["repeat"] == 12 and res["pretrain"]["steps"] == 3  # ceil(10 * 8 / 7) = 12
    assert "repeating the set 12x per epoch" in out and "data.repeat" in out
    summary = (tmp_path / "runs" / res["run_dir"].split("/")[-1] / "summary.md").read_text()
    assert "repeated 12x per epoch" in summary and "no leak" in summary
    assert "knn_mae" not in res  # no labels: reconstructions only


def test_demo_labelled_prints_both_knn_figures_with_budget(tiny_folder, tmp_path, capsys):
    from mimlab.demo import demo

    res = demo(
        data=str(tiny_folder),
        out=str(tmp_path / "runs"),
        preset="micro",
        steps=2,
        overrides=DEMO_OV,
    )
    out = capsys.readouterr().out
    assert res["figure_rows"][:3] == ["class0", "class1", "class2"]  # spread over classes
    assert res["figure_stats"] == "visible"
    for tag in ("mae", "random"):
        assert 0 <= res[f"knn_{tag}"]["top1"] <= 100
    assert f"MAE {res['knn_mae']['top1']:.2f}% (micro ViT, 2 steps x 8 = 16 images seen" in out
    assert f"random init {res['knn_random']['top1']:.2f}% (same micro ViT, 0 steps)" in out
    assert "MAE minus random init" in out
    assert res["reconstruction"]["psnr_visible_stats"] != res["reconstruction"]["psnr_true_stats"]
