"""The training loop reads nothing from the device between log steps: every
``Tensor.item`` / ``bool`` / ``float`` / ``int`` / ``tolist`` / ``numpy`` call made by a
micro-step, an optimizer step or the per-step bookkeeping is counted (on CPU, where the same
calls would be host-device syncs on a GPU), outside the designated sync points (log rows,
checkpoints, evaluators)."""

from __future__ import annotations

import collections
import contextlib
import functools
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path

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
        ("method.name=data2vec",),  # block masking, an EMA target
        ("method.name=cmae",),  # two views, colour jitter, token-wise InfoNCE
    ],
    ids=["mae", "accum-clip", "fp16", "simmim", "data2vec", "cmae"],
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


TORCHRUN = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or shutil.which(
    "torchrun"
)
REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.skipif(TORCHRUN is None, reason="torchrun not found")
def test_sigterm_under_ddp_stops_at_the_next_sync_point_and_resumes_exactly(cifar_dir, tmp_path):
    """Under torchrun the ranks agree on a signal only where the loop syncs anyway (log steps,
    checkpoints, epoch ends): SIGTERM to both ranks stops them at such a step, with a
    checkpoint from which the run continues to the same steps."""

    def args(name, *extra):
        return [
            "pretrain",
            f"--data={cifar_dir}",
            f"--out={tmp_path}",
            f"--name={name}",
            "model.preset=micro",
            "data.limit=96",
            "optim.batch_size=8",
            "optim.epochs=50",
            "run.max_steps=30",
            "run.log_every=5",
            "run.progress=false",
            "data.num_workers=0",
            "run.device=cpu",
            *extra,
        ]

    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [TORCHRUN, "--standalone", "--nproc_per_node=2", "-m", "mimlab.cli"]
    ref = subprocess.run([*cmd, *args("ref")], cwd=REPO, env=env, capture_output=True, text=True)
    assert ref.returncode == 0, ref.stderr[-2000:]
    p = subprocess.Popen(
        [*cmd, *args("run")], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    metrics, t0 = tmp_path / "run/metrics.jsonl", time.time()
    while not (metrics.exists() and metrics.read_text().strip()):  # the row of step 5
        assert p.poll() is None and time.time() - t0 < 180, "training did not start"
        time.sleep(0.05)
    kids = subprocess.run(["pgrep", "-P", str(p.pid)], capture_output=True, text=True)
    for pid in [int(x) for x in kids.stdout.split()]:
        os.kill(pid, signal.SIGTERM)
    _, err = p.communicate(timeout=300)
    ck = torch.load(tmp_path / "run/checkpoints/last.pt", weights_only=True)
    step = ck["global_step"]
    assert p.returncode != 0 and b"stopped by signal SIGTERM" in err, err[-2000:]
    assert 5 <= step < 30 and (step % 5 == 0 or step % 6 == 0), step  # a log step / epoch end
    res = subprocess.run(
        [*cmd, *args("run", "--resume=auto")], cwd=REPO, env=env, capture_output=True, text=True
    )
    assert res.returncode == 0, res.stderr[-2000:]

    def rows(d):
        out = [json.loads(l) for l in (tmp_path / d / "metrics.jsonl").read_text().splitlines()]
        return [{k: v for k, v in r.items() if k != "images_per_s"} for r in out]

    got, want = rows("run"), rows("ref")
    assert [r["step"] for r in got] == [r["step"] for r in want] == list(range(5, 31, 5))
    # the stopped and resumed run logs what the uninterrupted one does, after the stop too:
    # the checkpoint carries every rank's RNG state
    assert got == want
