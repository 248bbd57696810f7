"""The data path that feeds an accelerator: persistent workers reused across epochs deliver
what fresh ones would, the worker default from the visible cores, and evaluation features
under autocast."""

import pytest
import torch

from mimlab.core import config as C
from mimlab.core.config import DataConfig
from mimlab.data.datasets import build_dataset
from mimlab.eval.features import extract_features
from mimlab.train.engine import make_loader, next_epoch


def _ds(folder):
    return build_dataset(DataConfig(path=str(folder)), "train", 16, 3, 0, True, False)


def _epoch(loader):
    return [(b.index.tolist(), b.images.clone()) for b in loader]


def test_persistent_loader_serves_the_next_epoch_like_a_fresh_one(tiny_folder):
    ds = _ds(tiny_folder)
    kept = make_loader(ds, 4, 7, 0, num_workers=1, persistent=True, prefetch=3)
    first = _epoch(kept)
    workers = [w.pid for w in kept._iterator._workers]
    assert first and all(workers)
    next_epoch(kept, 1, start=8)  # epoch 1 from its 9th sample (a mid-epoch resume)
    got = _epoch(kept)
    assert [w.pid for w in kept._iterator._workers] == workers  # the same processes
    fresh = _epoch(make_loader(ds, 4, 7, 1, start=8, num_workers=1))
    assert [i for i, _ in got] == [i for i, _ in fresh] and len(got) == (24 - 8) // 4
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(got, fresh))
    assert [i for i, _ in got] != [i for i, _ in first][: len(got)]  # another epoch's order


def test_worker_default_from_visible_cores(monkeypatch):
    monkeypatch.setattr(C, "visible_cores", lambda: 16)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert C.data_workers(None) == 15
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")  # 4 processes share the machine's cores
    assert C.data_workers(None) == 3
    monkeypatch.setattr(C, "visible_cores", lambda: 1)
    assert C.data_workers(None) == 0  # one core: load in the main process
    monkeypatch.setattr(C, "visible_cores", lambda: 128)
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    assert C.data_workers(None) == 16 and C.data_workers(3) == 3


def test_prefetch_is_checked():
    with pytest.raises(C.ConfigError, match="data.prefetch must be >= 1"):
        C.resolve(C.PretrainConfig, overrides=["data.prefetch=0"])


def test_features_under_autocast(tiny_folder):
    ds = build_dataset(DataConfig(path=str(tiny_folder)), "train", 16, 3, 0, False, True)
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 16 * 16, 8))
    f32, y = extract_features(net, ds, "cpu", 8, num_workers=0, progress=False)
    bf, y2 = extract_features(
        net, ds, "cpu", 8, num_workers=0, progress=False, amp_dtype=torch.bfloat16
    )
    assert bf.dtype == torch.float32 and torch.equal(y, y2)
    assert not torch.equal(bf, f32)  # the matmul ran in bfloat16
    assert torch.allclose(bf, f32, atol=0.05 * f32.abs().max().item())
