"""Crash safety: SIGTERM/SIGINT, kill -9 at several points, unwritable run directories."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mimlab.cli import run

REPO = Path(__file__).resolve().parents[1]


def _args(data, out, name, *extra):
    return [
        "pretrain",
        f"--data={data}",
        f"--out={out}",
        f"--name={name}",
        "model.preset=micro",
        "data.limit=128",
        "optim.batch_size=16",
        "optim.epochs=6",
        "run.log_every=1",
        "run.progress=false",
        "data.num_workers=0",
        *extra,
    ]


def _curve(d):
    rows = [json.loads(l) for l in (d / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in rows if r["kind"] == "train"]


def _spawn(args):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import torch,sys; torch.set_num_threads(1); "
            "from mimlab.cli import run; sys.exit(run(sys.argv[1:]))",
            *args,
        ],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _wait_for_step(d: Path, step: int, proc, timeout=900):  # a hang guard, not a timing
    t0 = time.time()
    while time.time() - t0 < timeout:
        f = d / "metrics.jsonl"
        if f.exists():
            steps = [json.loads(l)["step"] for l in f.read_text().splitlines() if l.strip()]
            if steps and max(steps) >= step:
                return max(steps)
        if proc.poll() is not None:
            raise AssertionError(f"process ended early: {proc.communicate()}")
        time.sleep(0.02)
    raise AssertionError("timeout waiting for training progress")


@pytest.fixture(scope="module")
def reference(cifar_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref")
    assert run(_args(cifar_dir, out, "ref")) == 0
    return _curve(out / "ref")


def _assert_same_curve(a, b):
    assert [s for s, _ in a] == [s for s, _ in b]
    for (s, x), (_, y) in zip(a, b):
        assert abs(x - y) <= 1e-6, (s, x, y)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_writes_checkpoint_and_resumes_exactly(sig, cifar_dir, tmp_path, reference):
    p = _spawn(_args(cifar_dir, tmp_path, "run"))
    _wait_for_step(tmp_path / "run", 3, p)
    p.send_signal(sig)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 128 + int(sig), err
    assert f"stopped by signal {signal.Signals(sig).name}" in err and "resume" in err
    assert (tmp_path / "run/checkpoints/last.pt").exists()
    assert run(_args(cifar_dir, tmp_path, "run", "--resume=auto")) == 0
    _assert_same_curve(_curve(tmp_path / "run"), reference)


@pytest.mark.parametrize("kill_after", [2, 11, 25])
def test_kill9_then_resume_matches_uninterrupted(kill_after, cifar_dir, tmp_path, reference):
    p = _spawn(_args(cifar_dir, tmp_path, "run", "run.save_every_steps=3"))
    _wait_for_step(tmp_path / "run", kill_after, p)
    p.kill()
    p.communicate()
    ck = tmp_path / "run/checkpoints/last.pt"
    if kill_after >= 4:  # save_every_steps=3: a checkpoint exists and is complete
        import torch

        assert torch.load(ck, weights_only=True)["global_step"] >= 3
    assert run(_args(cifar_dir, tmp_path, "run", "--resume=auto")) == 0
    _assert_same_curve(_curve(tmp_path / "run"), reference)


def test_resume_auto_without_checkpoint_starts_fresh(cifar_dir, tmp_path, reference):
    assert run(_args(cifar_dir, tmp_path, "fresh", "--resume=auto")) == 0
    _assert_same_curve(_curve(tmp_path / "fresh"), reference)


def test_unwritable_run_directory_fails_at_start(cifar_dir, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    rc = run(_args(cifar_dir, blocker / "sub", "x"))
    err = capsys.readouterr().err
    assert rc == 1 and "cannot create run directory" in err


def test_missing_resume_checkpoint_is_clear(cifar_dir, tmp_path, capsys):
    rc = run(_args(cifar_dir, tmp_path, "y", f"--resume={tmp_path}/nope.pt"))
    assert rc == 1 and "checkpoint not found" in capsys.readouterr().err


def _rows(d):
    rows = [json.loads(l) for l in (d / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "images_per_s"} for r in rows]


def test_kill9_mid_window_then_resume_logs_the_same_rows(cifar_dir, tmp_path):
    """A logged window that spans a kill -9 + resume averages the steps on both sides of it,
    so the resumed run logs exactly the rows (every field but images/s) of an uninterrupted
    one. Rows every 7 steps, checkpoints every 3 steps and at epoch ends (8 steps)."""
    args = ["run.log_every=7", "run.save_every_steps=3"]
    assert run(_args(cifar_dir, tmp_path, "ref", *args)) == 0
    p = _spawn(_args(cifar_dir, tmp_path, "run", *args))
    _wait_for_step(tmp_path / "run", 7, p)
    p.kill()
    p.communicate()
    import torch

    ck = torch.load(tmp_path / "run/checkpoints/last.pt", weights_only=True)
    assert ck["global_step"] % 7 and ck["log_window"]["n"] > 0  # a window spans the kill
    assert run(_args(cifar_dir, tmp_path, "run", *args, "--resume=auto")) == 0
    ref, got = _rows(tmp_path / "ref"), _rows(tmp_path / "run")
    assert [r["step"] for r in ref if r["kind"] == "train"] == list(range(7, 48, 7)) + [48]
    assert got == ref
