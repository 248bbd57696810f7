"""Teacher-based masked image modeling: MaskDistill / SimMIM / MaskFeat / data2vec presets,
frozen and EMA targets, the teacher feature cache and mimlab checkpoints as teachers."""

import json

import pytest
import torch

from mimlab.core.config import METHOD_PRESETS, ConfigError, PretrainConfig, resolve
from mimlab.core.registry import presets_of
from mimlab.data.batch import Batch
from mimlab.data.datasets import build_dataset
from mimlab.methods import build_method
from mimlab.methods.targets import EMATarget, TeacherTarget
from mimlab.methods.teacher_cache import attach_teacher_cache
from mimlab.nn.losses import instance_norm_tokens
from mimlab.nn.models import build_encoder
from mimlab.nn.ops import patchify
from mimlab.nn.teachers import EfficientNetLite0Teacher, HOGTeacher, Teacher
from mimlab.tasks import load_encoder_weights, pretrain
from mimlab.train.engine import Engine, load_checkpoint

PRESETS = [n for n in presets_of("masked") if n != "mae"]  # MAE: tests/test_mae.py
FIXED_AUG = ("data.crop_scale=[1,1]", "data.hflip=false")
MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def _cfg(*ov, **kw):
    over = ["model.preset=micro", "method.teacher_size=64", *ov]
    over += [f"{k}={v}" for k, v in kw.items()]
    return resolve(PretrainConfig, overrides=over)


def _method(*ov):
    cfg = _cfg(*ov)
    torch.manual_seed(0)
    return build_method(cfg), cfg


def _run_cfg(data, out, name, *ov):
    return _cfg(
        f"data.path={data}",
        f"run.out_dir={out}",
        f"run.name={name}",
        "run.progress=false",
        "data.num_workers=0",
        "optim.batch_size=8",
        "optim.epochs=1",
        "run.max_steps=2",
        "run.log_every=1",
        *ov,
    )


def _pretrain(data, out, name, *ov):
    return pretrain(_run_cfg(data, out, name, *ov))


@pytest.fixture(scope="module")
def effnet():
    return EfficientNetLite0Teacher(student_mean=MEAN, student_std=STD, teacher_size=64)


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MIMLAB_CACHE", str(tmp_path / "cache"))


# ---------------------------------------------------------------------------------- presets
def test_preset_declarations():
    md = METHOD_PRESETS["maskdistill"]
    assert (
        md["mask"],
        md["mask_ratio"],
        md["student"],
        md["target"],
        md["target_norm"],
        md["head"],
        md["loss"],
        md["loss_beta"],
    ) == ("block", 0.4, "mask_token", "teacher", "layernorm", "linear", "smooth_l1", 2.0)
    sm = METHOD_PRESETS["simmim"]
    assert (sm["target"], sm["loss"], sm["mask_ratio"]) == ("pixels", "l1", 0.6)
    assert METHOD_PRESETS["maskfeat"]["target"] == "hog"
    assert METHOD_PRESETS["data2vec"]["target"] == "ema"
    # explicit fields win over the preset
    assert _cfg("method.name=maskdistill", "method.loss=cosine").method.loss == "cosine"


@pytest.mark.parametrize("name", PRESETS)
def test_preset_forward_backward_micro(name):
    m, cfg = _method(f"method.name={name}")
    x = torch.randn(3, 3, 32, 32)
    out = m(x)
    out_dim = getattr(m.target, "out_dim", 8 * 8 * 3)
    assert m.head.out_features == out_dim  # the target sets the linear head's width
    assert out["pred"].shape == out["target"].shape == (3, 16, out_dim)
    assert torch.isfinite(out["loss"])
    out["loss"].backward()
    assert m.encoder.blocks[0].attn.qkv.weight.grad.abs().sum() > 0
    assert m.encoder.mask_token.grad is not None
    assert not any(p.requires_grad for p in m.target.parameters())


def test_layernorm_targets_are_standardised_per_token():
    m, _ = _method("method.name=maskdistill")
    t = m(torch.randn(2, 3, 32, 32))["target"]
    assert torch.allclose(t.mean(-1), torch.zeros(2, 16), atol=1e-5)
    assert torch.allclose(t.var(-1, unbiased=False), torch.ones(2, 16), atol=1e-3)


def test_cache_needs_fixed_augmentation():
    with pytest.raises(ConfigError, match="crop_scale=\\[1,1\\] and data.hflip=false"):
        _cfg("method.name=maskdistill", "method.cache_teacher=true")
    with pytest.raises(ConfigError, match="target=teacher"):
        _cfg("method.name=mae", "method.cache_teacher=true", *FIXED_AUG)


# ---------------------------------------------------------------------------------- grids
class _PixelTeacher(Teacher):
    """Features = the de-normalised pixels themselves: per-patch means reveal the layout."""

    out_dim = 3

    def __init__(self):
        super().__init__(MEAN, STD, None, (0.0,) * 3, (1.0,) * 3)

    def features(self, x):
        return x


@pytest.mark.parametrize("img,patch", [(32, 8), (32, 4), (48, 16), (64, 8)])
def test_teacher_grid_matches_student_grid(img, patch, effnet):
    grid = (img // patch, img // patch)
    x = torch.randn(2, 3, img, img)
    pix = x * torch.tensor(STD).view(1, 3, 1, 1) + torch.tensor(MEAN).view(1, 3, 1, 1)
    t = TeacherTarget(_PixelTeacher(), grid)(x)  # row-major patch means, in pixels
    ref = patchify(pix, patch).view(2, grid[0] * grid[1], patch * patch, 3).mean(2)
    assert torch.allclose(t, ref, atol=1e-5)
    for teacher in (effnet, HOGTeacher(student_mean=MEAN, student_std=STD)):
        f = TeacherTarget(teacher, grid)(x)
        assert f.shape == (2, grid[0] * grid[1], teacher.out_dim) and torch.isfinite(f).all()
    m, _ = _method("method.name=maskdistill", f"model.img_size={img}", f"model.patch_size={patch}")
    assert m(x)["target"].shape == (2, grid[0] * grid[1], 1280)


# ---------------------------------------------------------------------------------- frozen
def test_teacher_frozen_through_engine_steps(tiny_folder, tmp_path):
    cfg = _run_cfg(tiny_folder, tmp_path, "frozen", "method.name=maskdistill")
    ds = build_dataset(cfg.data, "train", 32, 3, 0, train_aug=True, labelled=False)
    torch.manual_seed(0)
    m = build_method(cfg, ds.mean, ds.std)
    teacher = m.target.teacher
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    student = m.encoder.blocks[0].attn.qkv.weight.detach().clone()
    assert not {id(p) for p in teacher.parameters()} & {id(p) for p in m.parameters()}
    assert not any(k.startswith("target.") for k in m.state_dict())
    Engine(m, ds, cfg, cfg.optim, cfg.run, tmp_path / "frozen", device=torch.device("cpu")).fit()
    assert not torch.equal(student, m.encoder.blocks[0].attn.qkv.weight)  # the student learnt
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())
    assert all(not p.requires_grad and p.grad is None for p in teacher.parameters())
    assert not teacher.training


def test_maskdistill_checkpoint_has_no_teacher_and_resumes_exactly(tiny_folder, tmp_path):
    ref = _pretrain(tiny_folder, tmp_path, "ref", "method.name=maskdistill", "run.max_steps=3")
    _pretrain(
        tiny_folder,
        tmp_path,
        "chunk",
        "method.name=maskdistill",
        "run.max_steps=3",
        "run.stop_at_step=2",
    )
    ck = load_checkpoint(tmp_path / "chunk/checkpoints/last.pt")
    assert ck["global_step"] == 2
    keys = set(ck["model"])
    assert not [k for k in keys if k.startswith("target.")]
    m, _ = _method("method.name=maskdistill")
    assert keys == set(m.state_dict())
    res = _pretrain(
        tiny_folder,
        tmp_path,
        "chunk",
        "method.name=maskdistill",
        "run.max_steps=3",
        "run.resume=auto",
    )
    assert res["steps"] == 3
    a = load_checkpoint(ref["checkpoint"])["model"]
    b = load_checkpoint(res["checkpoint"])["model"]
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


# ---------------------------------------------------------------------------------- pretrain
@pytest.mark.parametrize("name", PRESETS)
def test_preset_pretrains_two_steps(name, tiny_folder, tmp_path):
    res = _pretrain(tiny_folder, tmp_path, name, f"method.name={name}")
    assert res["steps"] == 2 and res["final_loss"] is not None
    assert torch.isfinite(torch.tensor(res["final_loss"]))
    keys = load_checkpoint(res["checkpoint"])["model"]
    assert any(k.startswith("target.ema.") for k in keys) == (name == "data2vec")


# ---------------------------------------------------------------------------------- EMA
def test_ema_target_update_is_exact():
    m, cfg = _method("method.name=data2vec", "method.ema_momentum=0.9")
    tgt = m.target
    assert isinstance(tgt, EMATarget) and tgt.top_k == 2  # top-6 clipped to the micro depth
    online = dict(m.encoder.named_parameters())
    assert all(torch.equal(p, online[k]) for k, p in tgt.ema.named_parameters())
    old = {k: p.clone() for k, p in tgt.ema.named_parameters()}
    opt = torch.optim.SGD(m.parameters(), lr=0.5)
    m(torch.randn(4, 3, 32, 32))["loss"].backward()
    opt.step()
    m.after_step(1, 10)
    changed = 0
    for k, p in tgt.ema.named_parameters():
        assert torch.allclose(p, 0.9 * old[k] + 0.1 * online[k], atol=3e-7, rtol=0), k
        changed += not torch.equal(p, old[k])
    assert changed > 0
    # the target: full image, top-K block outputs, instance-normalised, averaged
    x = torch.randn(2, 3, 32, 32)
    _, blocks = tgt.ema.forward_features(x, return_blocks=True, apply_norm=False)
    ref = sum(instance_norm_tokens(b[:, 1:]) for b in blocks) / 2
    assert torch.allclose(tgt(x), ref, atol=1e-6)
    # EMA weights are part of the checkpoint: a fresh method restores them exactly
    m2, _ = _method("method.name=data2vec")
    m2.load_state_dict(m.state_dict())
    assert all(
        torch.equal(p, dict(tgt.ema.named_parameters())[k])
        for k, p in m2.target.ema.named_parameters()
    )


# ---------------------------------------------------------------------------------- cache
def test_teacher_cache_reused_and_invalidated(tiny_folder, tmp_path, monkeypatch):
    calls = []
    fwd = EfficientNetLite0Teacher.forward
    monkeypatch.setattr(
        EfficientNetLite0Teacher,
        "forward",
        lambda self, *a, **k: calls.append(1) or fwd(self, *a, **k),
    )
    base = ("method.name=maskdistill", "method.cache_teacher=true", *FIXED_AUG)
    r1 = _pretrain(tiny_folder, tmp_path, "c1", *base)
    assert r1["teacher_cache_built"] and len(calls) == 3  # 24 images in batches of 8
    calls.clear()
    r2 = _pretrain(tiny_folder, tmp_path, "c2", *base)
    assert not r2["teacher_cache_built"] and r2["teacher_cache"] == r1["teacher_cache"]
    assert not calls  # training used the cache only
    assert r2["final_loss"] == pytest.approx(r1["final_loss"], abs=1e-6)
    r3 = _pretrain(tiny_folder, tmp_path, "c3", *base, "method.teacher_size=32")
    r4 = _pretrain(tiny_folder, tmp_path, "c4", *base, "method.teacher=effnet_lite0:blocks")
    assert r3["teacher_cache_built"] and r4["teacher_cache_built"]
    assert len({r1["teacher_cache"], r3["teacher_cache"], r4["teacher_cache"]}) == 3
    assert all(str(tmp_path / "cache" / "teacher") in r["teacher_cache"] for r in (r1, r3, r4))


def test_cached_features_match_the_live_teacher(tiny_folder, tmp_path):
    cfg = _run_cfg(
        tiny_folder,
        tmp_path,
        "x",
        "method.name=maskdistill",
        "method.cache_teacher=true",
        "data.repeat=2",
        *FIXED_AUG,
    )
    ds = build_dataset(cfg.data, "train", 32, 3, 0, train_aug=True, labelled=False)
    assert len(ds) == 2 * len(ds.indices)
    m = build_method(cfg, ds.mean, ds.std)
    batch_fn, cache = attach_teacher_cache(m, ds, cfg, torch.device("cpu"))
    n = len(ds.indices)
    items = [ds[(i, 3)] for i in (5, 0, 23, n + 5)]  # any epoch: fixed augmentation
    assert [it.index for it in items] == [5, 0, 23, 5]  # data.repeat copies share a row
    batch = Batch(
        torch.stack([it.images for it in items]),
        torch.tensor([0] * 4),
        torch.tensor([it.index for it in items]),
        torch.zeros(4),
    )
    live = m.target(batch.images)  # no indices: runs the teacher
    assert batch_fn(batch) is batch  # the batch goes on unchanged
    cached = m.target(batch.images)
    assert torch.allclose(cached, live, atol=2e-2, rtol=1e-2)
    assert m.target._indices is None  # consumed by that forward


# ---------------------------------------------------------------------------------- mimlab:
def test_mimlab_checkpoint_as_teacher(tiny_folder, tmp_path):
    mae = _pretrain(tiny_folder, tmp_path, "mae", "method.name=mae")
    spec = f"method.teacher=mimlab:{mae['checkpoint']}"
    m, _ = _method("method.name=maskdistill", spec, "method.teacher_size=null")
    assert m.target.out_dim == 32 and m.head.out_features == 32
    enc = build_encoder(_cfg().model, mask_token=False)
    load_encoder_weights(enc, mae["checkpoint"])
    x = torch.randn(2, 3, 32, 32)
    # same grid and (results.json) normalisation as the student: the encoder's patch tokens
    assert torch.allclose(m.target(x), enc.eval().forward_features(x)[:, 1:], atol=1e-5)
    res = _pretrain(
        tiny_folder,
        tmp_path,
        "distill",
        "method.name=maskdistill",
        spec,
        "method.teacher_size=null",
    )
    assert res["steps"] == 2 and torch.isfinite(torch.tensor(res["final_loss"]))
    assert not [k for k in load_checkpoint(res["checkpoint"])["model"] if k.startswith("target.")]
    assert json.loads((tmp_path / "mae/results.json").read_text())["data_mean"] == MEAN
