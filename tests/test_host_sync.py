"""The training loop reads nothing from the device between log steps: every
``Tensor.item`` / ``bool`` / ``float`` / ``int`` / ``tolist`` / ``numpy`` call made by a
micro-step, an optimizer step or the per-step bookkeeping is counted (on CPU, where the same
calls would be host-device syncs on a GPU), outside the designated sync points (log rows,
checkpoints, evaluators)."""

from __future__ import annotations

import collections
import contextlib
import functools
import traceback

import pytest
import torch
from conftest import micro_pretrain_cfg

from mimlab import tasks
from mimlab.train.engine import Engine

READS = ("item", "__bool__", "__float__", "__int__", "__index__", "tolist", "numpy")
HOT = ("_micro_step", "_optimizer_step", "_after_step")
SYNC_POINTS = ("_drain", "_log_window", "_checkpoint", "_run_evaluators")


class SyncCounter:
    def __init__(self):
        self.depth = 0  # > 0 inside a hot method
        self.paused = 0  # > 0 inside a sync point
        self.hot: collections.Counter = collections.Counter()  # hot-path reads, by caller
        self.at_sync_points = 0  # reads inside sync points (shows the counter sees reads)

    def reads(self, name, real):
        @functools.wraps(real)
        def wrapper(t, *a, **k):
            if self.depth and not self.paused:
                caller = traceback.extract_stack(limit=2)[0]
                self.hot[f"{name} at {caller.filename}:{caller.lineno}"] += 1
            elif self.paused:
                self.at_sync_points += 1
            return real(t, *a, **k)

        return wrapper

    def scope(self, attr, real):
        @functools.wraps(real)
        def wrapper(*a, **k):
            setattr(self, attr, getattr(self, attr) + 1)
            try:
                return real(*a, **k)
            finally:
                setattr(self, attr, getattr(self, attr) - 1)

        return wrapper


@contextlib.contextmanager
def counting(monkeypatch):
    c = SyncCounter()
    for name in READS:
        monkeypatch.setattr(torch.Tensor, name, c.reads(name, getattr(torch.Tensor, name)))
    for name in HOT:
        monkeypatch.setattr(Engine, name, c.scope("depth", getattr(Engine, name)))
    for name in SYNC_POINTS:
        monkeypatch.setattr(Engine, name, c.scope("paused", getattr(Engine, name)))
    yield c


@pytest.mark.parametrize(
    "extra",
    [
        (),
        ("optim.accum_steps=2", "optim.batch_size=8", "optim.clip_grad=1.0"),
        ("run.precision=fp16",),
        ("method.name=simmim",),  # a mask token, random masking
    ],
    ids=["mae", "accum-clip", "fp16", "simmim"],
)
def test_no_host_read_between_log_steps(cifar_dir, tmp_path, monkeypatch, extra):
    cfg = micro_pretrain_cfg(cifar_dir, tmp_path, "run", "optim.epochs=1", *extra, log_every=4)
    with counting(monkeypatch) as c:
        res = tasks.pretrain(cfg)
    assert res["steps"] == 6
    assert not c.hot, f"host reads on the hot path: {dict(c.hot)}"
    assert c.at_sync_points > 0  # the patched reads do fire (at the log rows)


def test_the_counter_sees_a_per_step_read(cifar_dir, tmp_path, monkeypatch):
    """The unfused AdamW path reads the skip flag once per optimizer step: counted."""
    cfg = micro_pretrain_cfg(cifar_dir, tmp_path, "run", "optim.epochs=1", "optim.fused=false")
    with counting(monkeypatch) as c:
        tasks.pretrain(cfg)
    assert any(k.startswith("__bool__ at") and "engine.py" in k for k in c.hot), c.hot
