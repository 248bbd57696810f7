"""``data.resident``: the training set on the device, augmented per batch there."""

import json

import pytest
import torch
from conftest import make_imagefolder, micro_pretrain_cfg

from mimlab import tasks
from mimlab.core.config import DataConfig
from mimlab.data.datasets import EpochSampler, build_dataset
from mimlab.data.resident import augment, resident_dataset

MEAN, STD = torch.tensor([0.5, 0.4, 0.3]), torch.tensor([0.2, 0.25, 0.3])


def _u(area_u, ratio_u, x_u, y_u, flip_u, n=2):
    return torch.tensor([[area_u, ratio_u, x_u, y_u, flip_u]] * n)


def _imgs(n=2, size=32):
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (n, 3, size, size), generator=g, dtype=torch.uint8)


def _norm(x):
    return (x.float() / 255 - MEAN.view(1, 3, 1, 1)) / STD.view(1, 3, 1, 1)


def test_the_whole_image_unflipped_is_the_image_and_flipped_is_its_mirror():
    x = _imgs()
    # scale (1, 1) with ratio 1 (the log-ratio range's middle) is the whole image
    same = augment(x, _u(0.0, 0.5, 0.3, 0.7, 0.9), 32, (1.0, 1.0), True, MEAN, STD)
    assert torch.allclose(same, _norm(x), atol=1e-5)
    flip = augment(x, _u(0.0, 0.5, 0.3, 0.7, 0.1), 32, (1.0, 1.0), True, MEAN, STD)
    assert torch.allclose(flip, _norm(x).flip(-1), atol=1e-5)
    off = augment(x, _u(0.0, 0.5, 0.3, 0.7, 0.1), 32, (1.0, 1.0), False, MEAN, STD)
    assert torch.allclose(off, _norm(x), atol=1e-5)  # hflip off: never mirrored


def test_a_quarter_box_at_the_corner_is_that_corner_pixel_for_pixel():
    x = _imgs()
    # area 0.25, ratio 1: a 16 x 16 box; uniforms 0 put it at the top-left corner
    tl = augment(x, _u(0.0, 0.5, 0.0, 0.0, 0.9), 16, (0.25, 0.25), True, MEAN, STD)
    assert torch.allclose(tl, _norm(x[:, :, :16, :16]), atol=1e-5)
    br = augment(x, _u(0.0, 0.5, 1.0, 1.0, 0.9), 16, (0.25, 0.25), True, MEAN, STD)
    assert torch.allclose(br, _norm(x[:, :, 16:, 16:]), atol=1e-5)


def _resident(tmp_path, repeat=1):
    data = make_imagefolder(tmp_path / "d", classes=3, per_class=10)
    cfg = DataConfig(path=str(data), repeat=repeat)
    base = build_dataset(cfg, "train", 32, 3, 0, train_aug=True, labelled=False)
    return base, resident_dataset(base, 32, [0.2, 1.0], True)


def test_loader_follows_the_epoch_order_and_resumes_mid_epoch(tmp_path):
    base, ds = _resident(tmp_path, repeat=2)
    assert len(ds) == len(base) == 60 and ds.images.dtype == torch.uint8
    full = list(ds.make_loader(8, seed=3, epoch=1))
    order = [i for i, _ in EpochSampler(60, 3, 1)]
    assert len(full) == 7  # full batches only
    assert torch.equal(torch.cat([b.index for b in full]), torch.tensor(order[:56]) % 30)
    labels = torch.tensor(base.src.labels)[torch.tensor(base.indices)]
    for b in full:
        assert torch.equal(b.labels, labels[b.index])
    part = list(ds.make_loader(8, seed=3, epoch=1, start=24))  # resumed after 3 batches
    for a, b in zip(full[3:], part):
        assert torch.equal(a.images, b.images) and torch.equal(a.index, b.index)
    # two ranks see the two halves of the same global order, with the same augmentation
    r0 = list(ds.make_loader(4, seed=3, epoch=1, rank=0, world=2))
    r1 = list(ds.make_loader(4, seed=3, epoch=1, rank=1, world=2))
    assert torch.equal(r0[0].index, torch.tensor(order[0:8:2]) % 30)
    assert torch.equal(r1[0].index, torch.tensor(order[1:8:2]) % 30)
    one = ds.make_loader(8, seed=3, epoch=1)
    first = next(iter(one)).images
    assert torch.allclose(first[0::2], r0[0].images) and torch.allclose(first[1::2], r1[0].images)
    other = next(iter(ds.make_loader(8, seed=3, epoch=2))).images
    assert not torch.equal(first, other)  # another epoch, other crops


def test_pretraining_on_a_resident_set_resumes_exactly(tmp_path):
    data = make_imagefolder(tmp_path / "d", classes=3, per_class=32)
    ex = ("data.resident=true",)
    tasks.pretrain(micro_pretrain_cfg(data, tmp_path, "full", *ex))
    tasks.pretrain(micro_pretrain_cfg(data, tmp_path, "split", *ex, "run.stop_at_step=4"))
    tasks.pretrain(micro_pretrain_cfg(data, tmp_path, "split", *ex, "run.resume=auto"))

    def losses(name):
        rows = [
            json.loads(x) for x in (tmp_path / name / "metrics.jsonl").read_text().split("\n") if x
        ]
        return [(r["step"], r["loss"]) for r in rows if r["kind"] == "train"]

    a, b = losses("full"), losses("split")
    assert [s for s, _ in a] == [s for s, _ in b] == list(range(1, 13))
    assert all(la == pytest.approx(lb, abs=1e-6) for (_, la), (_, lb) in zip(a, b))
    wa = torch.load(tmp_path / "full/checkpoints/last.pt", weights_only=True)["model"]
    wb = torch.load(tmp_path / "split/checkpoints/last.pt", weights_only=True)["model"]
    assert all(torch.allclose(wa[k], wb[k], atol=1e-6) for k in wa)


def test_bench_resident_runs_and_reports_a_ratio(tmp_path):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_resident.py"
    spec = importlib.util.spec_from_file_location("bench_resident", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    data = make_imagefolder(tmp_path / "d", classes=2, per_class=20)
    out = mod.main(
        [
            "--data",
            str(data),
            "--images",
            "40",
            "--batch",
            "8",
            "--batches",
            "2",
            "--reps",
            "1",
            "--workers",
            "0",
            "--json",
            str(tmp_path / "r.jsonl"),
        ]
    )
    assert out["images"] == 40 and out["ratio"] == pytest.approx(
        out["resident_img_per_s"] / out["decoding_img_per_s"], rel=0.02
    )
    assert json.loads((tmp_path / "r.jsonl").read_text())["bench"] == "resident"
