"""``mimlab segment``: data layouts (ADE20K, CamVid, generic) and their one-line errors, the
augmentation, heads, metrics against a hand-computed confusion matrix, inference modes, a
linear head that overfits one image to mIoU 100, and the command end to end (micro ViT, tiny
generated folders, offline)."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch
from PIL import Image
from timm.models import register_model
from timm.models.vision_transformer import VisionTransformer

from mimlab import tasks
from mimlab.cli import run
from mimlab.core.config import (
    SEGMENT_RECIPES,
    ConfigError,
    SegmentConfig,
    SegmentOptions,
    load_yaml,
    resolve,
    save_yaml,
    to_dict,
)
from mimlab.data.datasets import DataError
from mimlab.data.segmentation import (
    IGNORE,
    SegTrainTransform,
    rescale_size,
    scan_segmentation,
    seg_splits,
)
from mimlab.eval.segment import Segmenter, evaluate, infer_slide, infer_whole
from mimlab.nn.models import ViTEncoder
from mimlab.nn.segmentation import (
    MultiScaleNeck,
    confusion_matrix,
    default_block_ids,
    poly_lr,
    scores_from_confusion,
    vit_feature_maps,
)

COMMON = [
    "run.progress=false",
    "data.num_workers=0",
    "model.preset=micro",
    "run.log_every=1",
]


def _scene(rng, h, w, num_classes):
    """An image whose colour follows a blocky label map (so the task is learnable)."""
    lab = np.zeros((h, w), np.uint8)
    for k in range(num_classes):
        y, x = rng.integers(0, h - 4), rng.integers(0, w - 4)
        lab[y : y + h // 2, x : x + w // 2] = k
    base = rng.integers(0, 255, (num_classes, 3))
    img = base[lab] + rng.integers(-10, 10, (h, w, 3))
    return np.clip(img, 0, 255).astype(np.uint8), lab


def make_seg_folder(root, layout="camvid", n=3, h=40, w=56, num_classes=11, seed=0):
    """images/<split>/*.jpg|png + annotations/<split>/*.png; camvid: 11 = void; ade20k:
    ADEChallengeData2016 with training/validation and 0 = ignore (labels shifted by 1)."""
    rng = np.random.default_rng(seed)
    if layout == "ade20k":
        root = root / "ADEChallengeData2016"
        splits = ("training", "validation")
    else:
        splits = ("train", "val", "test")
    for split in splits:
        (root / "images" / split).mkdir(parents=True)
        (root / "annotations" / split).mkdir(parents=True)
        for i in range(n):
            img, lab = _scene(rng, h, w, min(num_classes, 4))
            if layout == "ade20k":
                lab = lab + 1
                lab[:2, :] = 0  # "other": ignored
            elif layout == "camvid":
                lab[:2, :] = 11  # void
            Image.fromarray(img).save(root / "images" / split / f"s{i:03d}.png")
            Image.fromarray(lab).save(root / "annotations" / split / f"s{i:03d}.png")
    return root if layout != "ade20k" else root.parent


def _seg(**kw):
    return SegmentOptions(**{"check_masks": True, "crop_size": 32, "scale": [64, 48], **kw})


# ------------------------------------------------------------------------------- data
def test_layouts_detected_and_mapped(tmp_path):
    from mimlab.core.config import DataConfig

    cam = make_seg_folder(tmp_path / "camvid")
    src = scan_segmentation(DataConfig(path=str(cam)), _seg(), "train")
    assert (src.num_classes, src.ignore_value, src.offset, len(src.images)) == (11, 11, 0, 3)
    raw = np.array([[0, 10, 11]])
    assert src.to_labels(raw).tolist() == [[0, 10, IGNORE]]
    ade = make_seg_folder(tmp_path / "ade", layout="ade20k")
    src = scan_segmentation(DataConfig(path=str(ade)), _seg(), "train")  # train -> training
    assert src.name == "ade20k/training" and (src.num_classes, src.offset) == (150, 1)
    assert src.to_labels(np.array([[0, 1, 150]])).tolist() == [[IGNORE, 0, 149]]
    gen = make_seg_folder(tmp_path / "generic", layout="generic", num_classes=4)
    with pytest.raises(DataError, match="segment.num_classes"):
        scan_segmentation(DataConfig(path=str(gen)), _seg(), "train")
    src = scan_segmentation(DataConfig(path=str(gen)), _seg(num_classes=4), "train")
    assert (src.num_classes, src.ignore_value) == (4, 255)


def test_mask_errors_name_the_file(tmp_path):
    from mimlab.core.config import DataConfig

    root = make_seg_folder(tmp_path / "camvid")
    bad = root / "annotations" / "val" / "s001.png"
    Image.fromarray(np.zeros((10, 10), np.uint8)).save(bad)  # wrong size
    data = DataConfig(path=str(root), train_split="train", val_split="val")
    with pytest.raises(DataError) as e:
        seg_splits(data, _seg(), 3, 0, [0.5] * 3, [0.5] * 3)
    msg = str(e.value)
    assert str(bad) in msg and "10x10" in msg and "56x40" in msg and "\n" not in msg
    lab = np.full((40, 56), 3, np.uint8)
    lab[5, 5] = 17  # out of range (classes 0..10, void 11)
    Image.fromarray(lab).save(bad)
    with pytest.raises(DataError) as e:
        seg_splits(data, _seg(), 3, 0, [0.5] * 3, [0.5] * 3)
    msg = str(e.value)
    assert str(bad) in msg and "class id 17" in msg and "\n" not in msg
    # the same check while loading when the up-front scan is off
    _, val = seg_splits(data, _seg(check_masks=False), 3, 0, [0.5] * 3, [0.5] * 3)
    with pytest.raises(DataError, match="class id 17"):
        val[1]
    (root / "annotations" / "val" / "s002.png").unlink()
    with pytest.raises(DataError, match="s002.png"):
        scan_segmentation(data, _seg(), "val")


def test_cli_one_line_errors(tmp_path, capsys):
    root = make_seg_folder(tmp_path / "camvid")
    lab = np.full((40, 56), 3, np.uint8)
    lab[0, 0] = 200
    bad = root / "annotations" / "train" / "s000.png"
    Image.fromarray(lab).save(bad)
    rc = run(["segment", "--data", str(root), "--out", str(tmp_path / "runs"), *COMMON])
    err = capsys.readouterr().err.strip()
    assert rc == 1 and len(err.splitlines()) == 1
    assert str(bad) in err and "class id 200" in err
    rc = run(["segment", "--data", str(root), "segment.head=uper", *COMMON])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "did you mean 'upernet'" in err and len(err.splitlines()) == 1


def test_train_transform_crop_flip_pad_and_seeded(tmp_path):
    from mimlab.core.config import DataConfig

    root = make_seg_folder(tmp_path / "camvid")
    seg = _seg(crop_size=48, scale=[40, 30], ratio_range=[0.5, 1.0])  # smaller than the crop
    tr, _ = seg_splits(DataConfig(path=str(root), val_split="val"), seg, 3, 0, [0.5] * 3, [0.5] * 3)
    a, b = tr[(0, 3)], tr[(0, 3)]
    assert a.images.shape == (3, 48, 48) and a.labels.shape == (48, 48)
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    assert (a.labels == IGNORE).any()  # padding (and void) is ignored
    assert not torch.equal(tr[(0, 4)].images, a.images)
    assert rescale_size(360, 480, [2048, 512]) == (512, 683)
    assert rescale_size(360, 480, [160, 120], 0.5) == (60, 80)
    # without photometric jitter the image crop matches the label crop (pixels of one class
    # share a colour up to the generator's noise)
    t = SegTrainTransform(
        _seg(crop_size=16, photometric=False, scale=[56, 40]), [0.0] * 3, [1.0] * 3
    )
    img = torch.zeros(3, 40, 56, dtype=torch.uint8)
    lab = torch.zeros(40, 56, dtype=torch.long)
    img[:, :, 28:] = 255
    lab[:, 28:] = 1
    for seed in range(5):  # the transform draws from Python's and torch's generators
        random.seed(seed)
        torch.manual_seed(seed)
        x, y = t((img, lab))
        # away from the one column where bilinear (image) and nearest (labels) resampling may
        # round the 0/255 edge differently, the image crop is the label crop
        agree = ((x[0] > 0.5).long() == y).float().mean(0)  # per column
        assert (agree < 1).sum() <= 1, (seed, agree)


# ------------------------------------------------------------------------------- metrics
def test_confusion_matrix_and_scores_by_hand():
    target = torch.tensor([[0, 0, 1, 1], [2, 2, IGNORE, 1]])
    pred = torch.tensor([[0, 1, 1, 1], [2, 0, 2, 2]])
    cm = confusion_matrix(pred, target, 3)
    # rows ground truth, columns prediction; the ignored pixel is not counted
    assert cm.tolist() == [[1, 1, 0], [0, 2, 1], [1, 0, 1]]
    s = scores_from_confusion(cm)
    # IoU0 = 1 / (2 + 2 - 1) ; IoU1 = 2 / (3 + 3 - 2) ; IoU2 = 1 / (2 + 2 - 1)
    assert s["iou"] == pytest.approx([100 / 3, 50.0, 100 / 3])
    assert s["miou"] == pytest.approx((100 / 3 + 50 + 100 / 3) / 3)
    assert s["pixel_acc"] == pytest.approx(100 * 4 / 7)
    # a class absent from ground truth and prediction has no IoU and is not averaged
    s = scores_from_confusion(confusion_matrix(pred, target, 4))
    assert s["iou"][3] is None and s["miou"] == pytest.approx((100 / 3 + 50 + 100 / 3) / 3)


def test_poly_schedule():
    assert poly_lr(0, 100, 10, 1.0, 0.0, 1.0) == 0.0
    assert poly_lr(5, 100, 10, 1.0, 0.0, 1.0) == pytest.approx(0.5)
    assert poly_lr(10, 100, 10, 1.0, 0.0, 1.0) == pytest.approx(1.0)
    assert poly_lr(55, 100, 10, 1.0, 0.0, 1.0) == pytest.approx(0.5)
    assert poly_lr(55, 100, 10, 1.0, 0.0, 2.0) == pytest.approx(0.25)
    assert poly_lr(100, 100, 10, 1.0, 0.1, 1.0) == pytest.approx(0.1)


# ------------------------------------------------------------------------------- model
def _enc(img=32, patch=8, depth=4):
    torch.manual_seed(0)
    return ViTEncoder(img, patch, 3, 32, depth, 2, mask_token=False)


def test_feature_maps_any_size_match_encoder_at_its_size():
    enc = _enc().eval()
    x = torch.randn(2, 3, 32, 32)
    (m,) = vit_feature_maps(enc, x, [4], final_norm=True)
    ref = enc.forward_features(x)[:, 1:, :].transpose(1, 2).reshape(2, 32, 4, 4)
    assert torch.allclose(m, ref, atol=1e-5)
    maps = vit_feature_maps(enc, torch.randn(1, 3, 48, 64), [1, 2, 3, 4])
    assert [tuple(t.shape) for t in maps] == [(1, 32, 6, 8)] * 4
    neck = MultiScaleNeck(32)
    assert [tuple(t.shape[-2:]) for t in neck(maps)] == [(24, 32), (12, 16), (6, 8), (3, 4)]
    assert default_block_ids(12) == [4, 6, 8, 12] and default_block_ids(24) == [8, 12, 16, 24]


@pytest.mark.parametrize("head", ["linear", "upernet"])
def test_segmenter_shapes_and_inference_modes(head):
    model = Segmenter(_enc(), 5, head, channels=16, aux_weight=0.4).eval()
    x = torch.randn(2, 3, 40, 56)  # not a multiple of the patch: whole mode pads
    lg = infer_whole(model, x)
    assert lg.shape == (2, 5, 40, 56)
    sl = infer_slide(model, x, crop=32, stride=16)
    assert sl.shape == (2, 5, 40, 56)
    # one window that covers the image exactly is the whole-image prediction
    y = torch.randn(1, 3, 32, 32)
    assert torch.allclose(infer_slide(model, y, 32, 32), infer_whole(model, y), atol=1e-5)
    model.train()
    out = model(torch.randn(2, 3, 32, 32), torch.randint(0, 5, (2, 32, 32)))
    assert out["loss"].ndim == 0 and torch.isfinite(out["loss"])
    assert ("loss_aux" in out) == (head == "upernet")


def test_linear_head_overfits_one_image_to_miou_100(tmp_path):
    """Training through the command: one CamVid-layout image, 4 classes, micro ViT, linear
    head, whole-image test on the same image: every pixel right."""
    root = make_seg_folder(tmp_path / "camvid", n=1, h=32, w=32)
    for split in ("val", "test"):  # score on the training image itself
        for sub in ("images", "annotations"):
            src = root / sub / "train" / "s000.png"
            (root / sub / split / "s000.png").write_bytes(src.read_bytes())
    # two classes, left and right half: a boundary between patches (8 px), where the
    # bilinear upsampling of the patch logits must learn to put the class change
    lab = np.zeros((32, 32), np.uint8)
    lab[:, 16:] = 1
    rng = np.random.default_rng(1)
    img = (
        (
            np.where(lab[..., None] == 0, [200, 40, 40], [40, 40, 200])
            + rng.integers(-20, 20, (32, 32, 3))
        )
        .clip(0, 255)
        .astype(np.uint8)
    )
    for split in ("train", "val", "test"):
        Image.fromarray(img).save(root / "images" / split / "s000.png")
        Image.fromarray(lab).save(root / "annotations" / split / "s000.png")
    cfg = tasks.resolve_run_config(
        SegmentConfig,
        overrides=[
            f"data.path={root}",
            f"run.out_dir={tmp_path / 'runs'}",
            "run.name=overfit",
            "segment.head=linear",
            "segment.crop_size=32",
            "segment.scale=[32,32]",
            "segment.ratio_range=[1,1]",
            "segment.photometric=false",
            "segment.test_mode=whole",
            "segment.iters=80",
            "segment.warmup_iters=10",
            "segment.figure_images=1",
            "data.repeat=4",
            "data.hflip=false",
            "optim.batch_size=4",
            "optim.lr=3e-3",
            "optim.layer_decay=1.0",
            "model.drop_path=0.0",
            *COMMON,
        ],
    )
    res = tasks.segment(cfg)
    assert res["steps"] == 80
    assert res["miou"] == 100.0 and res["pixel_acc"] == 100.0, res
    assert (tmp_path / "runs" / "overfit" / "predictions.png").stat().st_size > 0
    # the engine ran the poly schedule: the row logged after step s used lr(s - 1)
    rows = [json.loads(ln) for ln in (tmp_path / "runs" / "overfit" / "metrics.jsonl").open()]
    lrs = {r["step"]: r["lr"] for r in rows if r["kind"] == "train"}
    for s in (5, 11, 40, 80):
        assert lrs[s] == pytest.approx(poly_lr(s - 1, 80, 10, 3e-3, 0.0, 1.0))


def test_segment_command_ade20k_upernet_slide_and_pretrained(tmp_path, capsys):
    """ADE20K layout, UperNet + auxiliary head, sliding window, from a mimlab pretraining
    checkpoint at another resolution (position embeddings resampled), coloured PNGs."""
    root = make_seg_folder(tmp_path / "ade", layout="ade20k", n=2, h=40, w=48)
    from mimlab.core.config import PretrainConfig

    pre = resolve(
        PretrainConfig,
        overrides=[
            f"data.path={root / 'ADEChallengeData2016' / 'images' / 'training'}",
            "data.kind=folder",
            "data.train_split=",
            f"run.out_dir={tmp_path / 'runs'}",
            "run.name=pre",
            "run.max_steps=1",
            "optim.batch_size=2",
            "model.img_size=16",
            *COMMON,
        ],
    )
    ck = tasks.pretrain(pre)["checkpoint"]
    rc = run(
        [
            "segment",
            "--data",
            str(root),
            "--pretrained",
            ck,
            "--out",
            str(tmp_path / "runs"),
            "--name",
            "ade",
            "segment.crop_size=32",
            "segment.scale=[48,40]",
            "segment.iters=2",
            "segment.channels=8",
            "segment.save_predictions=true",
            "optim.batch_size=2",
            "run.progress=false",
            "data.num_workers=0",
            "run.log_every=1",
        ]
    )
    out = capsys.readouterr()
    assert rc == 0, out.err
    res = json.loads(out.out)
    assert res["dataset"] == "ade20k" and res["head"] == "upernet" and res["steps"] == 2
    assert len(res["iou"]) == 150 and 0 <= res["miou"] <= 100
    assert res["val_images"] == 2 and res["test_mode"] == "slide"
    d = tmp_path / "runs" / "ade"
    assert sorted(p.name for p in (d / "predictions").iterdir()) == ["s000.png", "s001.png"]
    cfg = load_yaml(d / "config.yaml")
    assert cfg["model"]["img_size"] == 32 and cfg["segment"]["pretrained"] == ck
    assert "loss_aux" in (d / "metrics.jsonl").read_text()


def test_evaluate_whole_equals_argmax_of_logits(tmp_path):
    from mimlab.core.config import DataConfig

    root = make_seg_folder(tmp_path / "camvid", n=2)
    seg = _seg(crop_size=32, scale=[56, 40])
    _, val = seg_splits(
        DataConfig(path=str(root), val_split="val"), seg, 3, 0, [0.5] * 3, [0.5] * 3
    )
    model = Segmenter(_enc(), 11, "linear").eval()
    res = evaluate(model, val, "cpu", "whole", eval_batch=2, keep=[1])
    cm = torch.zeros(11, 11, dtype=torch.int64)
    for i in range(len(val)):
        b = val[i]
        pred = infer_whole(model, b.images[None])[0].argmax(0)
        cm += confusion_matrix(pred, b.labels, 11)
    assert torch.equal(res["confusion"], cm) and [i for i, _ in res["kept"]] == [1]


# ------------------------------------------------------------------------------- config
def test_config_round_trip_recipes_and_validation(tmp_path):
    for name in SEGMENT_RECIPES:
        cfg = resolve(SegmentConfig, base=SEGMENT_RECIPES[name])
        save_yaml(cfg, tmp_path / "c.yaml")
        again = resolve(SegmentConfig, str(tmp_path / "c.yaml"))
        assert to_dict(again) == to_dict(cfg)
    ade = resolve(SegmentConfig, base=SEGMENT_RECIPES["ade20k_vit_b"])
    assert (ade.model.embed_dim, ade.model.depth, ade.segment.crop_size) == (768, 12, 512)
    assert (ade.segment.iters, ade.optim.batch_size, ade.segment.head) == (160000, 16, "upernet")
    with pytest.raises(ConfigError, match="segment.test_mode"):
        resolve(SegmentConfig, overrides=["segment.test_mode=sliding"])
    with pytest.raises(ConfigError, match="segment.stride"):
        resolve(SegmentConfig, overrides=["segment.crop_size=64", "segment.stride=65"])
    with pytest.raises(ConfigError, match="segment.blocks"):
        resolve(SegmentConfig, overrides=["segment.blocks=[1,2]"])


def test_help_lists_segment(capsys):
    with pytest.raises(SystemExit):
        run(["segment", "--help"])
    out = capsys.readouterr().out
    assert "--recipe" in out and "segment.head" in out and "camvid_cpu" in out


# ------------------------------------------------------------------------------- sources
def _timm_vit(**kw):
    for k in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"):
        kw.pop(k, None)
    return VisionTransformer(
        **{
            "img_size": 32,
            "patch_size": 8,
            "embed_dim": 32,
            "depth": 2,
            "num_heads": 2,
            "num_classes": 0,
            **kw,
        }
    )


@register_model
def mimlab_test_vit_seg(pretrained=False, **kw):
    """timm ViT with learned position embeddings, no head (test only)."""
    return _timm_vit(**kw)


def test_timm_source_learned_positions_resampled_like_timm(tmp_path):
    """A timm ViT with learned position embeddings at 32 px as the backbone of a 48-pixel
    crop: the last block's tokens equal timm's own dynamic-size forward (its bicubic
    resampling); then the command trains from it."""
    torch.manual_seed(0)
    ref = _timm_vit(dynamic_img_size=True).eval()
    torch.nn.init.normal_(ref.pos_embed, std=0.5)  # learned, far from sin-cos
    path = tmp_path / "vit.pth"
    torch.save(ref.state_dict(), path)
    from mimlab.io.sources import load_encoder

    sm = load_encoder(f"timm:mimlab_test_vit_seg@{path}", img_size=48)
    x = torch.randn(1, 3, 48, 48)
    (m,) = vit_feature_maps(sm.encoder.eval(), x, [2], final_norm=True)
    want = ref.forward_features(x)[:, 1:, :].transpose(1, 2).reshape(1, 32, 6, 6)
    assert torch.allclose(m, want, atol=1e-4)
    root = make_seg_folder(tmp_path / "camvid", n=2)
    rc = run(
        [
            "segment",
            "--data",
            str(root),
            "--pretrained",
            f"timm:mimlab_test_vit_seg@{path}",
            "--out",
            str(tmp_path / "runs"),
            "--name",
            "timm",
            "segment.crop_size=48",
            "segment.scale=[56,40]",
            "segment.head=linear",
            "segment.iters=1",
            "segment.test_mode=whole",
            "optim.batch_size=2",
            "run.progress=false",
            "data.num_workers=0",
        ]
    )
    assert rc == 0
    cfg = load_yaml(tmp_path / "runs" / "timm" / "config.yaml")
    assert cfg["model"]["embed_dim"] == 32 and cfg["model"]["img_size"] == 48
