"""torchrun + DistributedDataParallel on CPU (gloo, 2 processes)."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mimlab.cli import run

REPO = Path(__file__).resolve().parents[1]
TORCHRUN = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or shutil.which(
    "torchrun"
)


def _ft(data, out, name, bs):
    return [
        "finetune",
        f"--data={data}",
        f"--out={out}",
        f"--name={name}",
        "model.preset=micro",
        "model.drop_path=0",
        "finetune.mixup=0",
        "finetune.cutmix=0",
        "data.limit=64",
        "data.val_limit=20",
        f"optim.batch_size={bs}",
        "optim.epochs=2",
        "run.log_every=1",
        "run.progress=false",
        "data.num_workers=0",
        "run.device=cpu",
    ]


def _torchrun(args, tmp_path, nproc=2):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [TORCHRUN, "--standalone", f"--nproc_per_node={nproc}", "-m", "mimlab.cli", *args]
    p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    return p


@pytest.mark.skipif(TORCHRUN is None, reason="torchrun not found")
def test_ddp_two_processes_match_single_process(cifar_dir, tmp_path):
    _torchrun(_ft(cifar_dir, tmp_path, "ddp", 8), tmp_path)
    assert run(_ft(cifar_dir, tmp_path, "single", 16)) == 0
    ddp = json.loads((tmp_path / "ddp/results.json").read_text())
    single = json.loads((tmp_path / "single/results.json").read_text())
    assert ddp["world_size"] == 2 and single["world_size"] == 1
    assert ddp["ddp_max_param_divergence"] == 0.0  # replicas identical on every rank
    assert ddp["steps"] == single["steps"] == 8  # same global batch -> same steps
    a = torch.load(tmp_path / "ddp/checkpoints/last.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "single/checkpoints/last.pt", weights_only=True)["model"]
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst < 1e-4, worst
    # only rank 0 wrote files: one TensorBoard event file, one metrics row per step
    assert len(list((tmp_path / "ddp/tb").glob("events*"))) == 1
    rows = [json.loads(l) for l in (tmp_path / "ddp/metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["kind"] == "train"] == list(range(1, 9))


@pytest.mark.skipif(TORCHRUN is None, reason="torchrun not found")
def test_resume_with_a_different_number_of_processes(cifar_dir, tmp_path):
    pre = [
        "pretrain",
        f"--data={cifar_dir}",
        f"--out={tmp_path}",
        "--name=p",
        "model.preset=micro",
        "data.limit=64",
        "optim.batch_size=8",
        "optim.epochs=2",
        "run.progress=false",
        "data.num_workers=0",
        "run.device=cpu",
        "run.log_every=1",
    ]
    _torchrun(pre + ["run.stop_at_step=2"], tmp_path)  # 2 processes, global batch 16
    ck = torch.load(tmp_path / "p/checkpoints/last.pt", weights_only=True)
    assert ck["world_size"] == 2 and ck["global_step"] == 2 and ck["samples_in_epoch"] == 32
    # continue on 1 process with the same global batch
    one = [a if a != "optim.batch_size=8" else "optim.batch_size=16" for a in pre]
    assert run(one + ["--resume=auto"]) == 0
    res = json.loads((tmp_path / "p/results.json").read_text())
    assert res["steps"] == 8 and res["world_size"] == 1


@pytest.mark.skipif(TORCHRUN is None, reason="torchrun not found")
def test_a_dying_rank_does_not_hang_the_others(cifar_dir, tmp_path):
    import signal
    import time

    args = [
        "pretrain",
        f"--data={cifar_dir}",
        f"--out={tmp_path}",
        "--name=die",
        "model.preset=micro",
        "data.limit=64",
        "optim.batch_size=8",
        "optim.epochs=200",
        "run.progress=false",
        "data.num_workers=0",
        "run.device=cpu",
        "run.log_every=1",
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    p = subprocess.Popen(
        [TORCHRUN, "--standalone", "--nproc_per_node=2", "-m", "mimlab.cli", *args],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    metrics = tmp_path / "die/metrics.jsonl"
    t0 = time.time()
    while not (metrics.exists() and metrics.read_text().strip()):
        assert p.poll() is None and time.time() - t0 < 120, "training did not start"
        time.sleep(0.1)
    kids = subprocess.run(["pgrep", "-P", str(p.pid)], capture_output=True, text=True)
    pids = [int(x) for x in kids.stdout.split()]
    assert len(pids) == 2
    os.kill(pids[-1], signal.SIGKILL)  # one rank dies
    t1 = time.time()
    p.communicate(timeout=180)  # the other must not hang
    assert p.returncode != 0
    assert time.time() - t1 < 180


@pytest.mark.skipif(TORCHRUN is None, reason="torchrun not found")
def test_siamese_losses_under_ddp_equal_one_process(tmp_path):
    """C-MAE variants under DDP with 2 gloo processes (4 images each) give the loss and the
    gradients of one process on the global batch of 8: keys gathered across processes
    (position / batch / instance-wise negatives), global BatchNorm statistics in the heads and
    the global number of loss terms. Control: the two halves computed alone give other losses
    (per-process negatives and BN statistics would be wrong)."""
    out = tmp_path / "ddp_siamese.json"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [
        TORCHRUN,
        "--standalone",
        "--nproc_per_node=2",
        str(REPO / "tests/siamese_ddp_worker.py"),
        str(out),
    ]
    p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    report = json.loads(out.read_text())
    assert set(report) == {
        "position",
        "batch_chunked",
        "image_removed",
        "patch_cls",
        "cls",
        "byol",
        "independent",
    }
    for name, r in report.items():
        assert r["world"] == 2 and r["same_params"], name
        assert abs(r["loss_ddp"] - r["loss_single"]) < 1e-5 * max(1.0, r["loss_single"]), (name, r)
        assert r["max_grad_diff"] <= 1e-4 * r["max_grad"] + 1e-6, (name, r)
        assert abs(r["loss_halves"] - r["loss_single"]) > 5e-3, (name, r)


@pytest.mark.skipif(TORCHRUN is None, reason="torchrun not found")
def test_online_eval_and_logging_under_two_processes(cifar_dir, tmp_path):
    """Online k-NN under DDP: every rank encodes a share of the subset, features are
    gathered, rank 0 logs one row per evaluation; its value equals a one-process evaluation of
    the final weights. Rank 1 logs no INFO lines (no unformatted second start line)."""
    from mimlab.core.config import PretrainConfig, resolve
    from mimlab.methods import build_method
    from mimlab.train.online import build_online_evaluator

    args = [
        "pretrain",
        f"--data={cifar_dir}",
        f"--out={tmp_path}",
        "--name=oe",
        "model.preset=micro",
        "data.limit=64",
        "optim.batch_size=8",
        "optim.epochs=2",
        "run.progress=false",
        "data.num_workers=0",
        "run.device=cpu",
        "run.log_every=1",
        "eval.online_every=3",
        "eval.online_bank=41",
        "eval.online_queries=21",
    ]
    p = _torchrun(args, tmp_path)
    assert p.stderr.count("pretrain mae on 64 images") == 1, p.stderr[-2000:]
    assert "INFO:mimlab" not in p.stderr
    rows = [json.loads(l) for l in (tmp_path / "oe/metrics.jsonl").read_text().splitlines()]
    online = [r for r in rows if r["kind"] == "online"]
    assert [r["step"] for r in online] == [0, 3, 6, 8]  # 4 steps/epoch at global batch 16
    cfg = resolve(
        PretrainConfig,
        overrides=[a for a in args[1:] if "=" in a and "." in a.split("=")[0]]
        + [f"data.path={cifar_dir}"],
    )
    method = build_method(cfg)
    method.load_state_dict(
        torch.load(tmp_path / "oe/checkpoints/last.pt", weights_only=True)["model"]
    )
    res = json.loads((tmp_path / "oe/results.json").read_text())
    ev = build_online_evaluator(
        cfg.eval,
        cfg.data,
        cfg.model,
        cfg.run.seed,
        res["data_mean"],
        res["data_std"],
        torch.device("cpu"),
        tmp_path,
    )
    got = ev(method, 8)["knn_top1"]
    # same features up to float rounding of different batch shapes: at most one query differs
    assert abs(got - online[-1]["knn_top1"]) <= 100 / 21 + 1e-9


def _train_rows(d):
    rows = [json.loads(l) for l in (d / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in rows if r["kind"] == "train"]


@pytest.mark.skipif(TORCHRUN is None, reason="torchrun not found")
def test_chunked_run_under_torchrun_equals_straight_run(cifar_dir, tmp_path):
    """2 gloo processes: a run stopped at step 3 (mid-epoch, run.stop_at_step) and resumed with
    run.resume=auto logs the loss of an uninterrupted run step by step and ends with the same
    weights. Each rank's RNG (masking noise) must be saved and restored, not only rank 0's."""
    args = [
        "pretrain",
        f"--data={cifar_dir}",
        f"--out={tmp_path}",
        "model.preset=micro",
        "method.name=mae",
        "data.limit=64",
        "optim.batch_size=8",
        "optim.epochs=2",
        "run.progress=false",
        "data.num_workers=0",
        "run.device=cpu",
        "run.log_every=1",
    ]
    _torchrun(args + ["--name=straight"], tmp_path)
    _torchrun(args + ["--name=chunked", "run.stop_at_step=3"], tmp_path)
    ck = torch.load(tmp_path / "chunked/checkpoints/last.pt", weights_only=True)
    assert ck["global_step"] == 3 and len(ck["rng_ranks"]) == 2
    _torchrun(args + ["--name=chunked", "--resume=auto"], tmp_path)
    a, b = _train_rows(tmp_path / "straight"), _train_rows(tmp_path / "chunked")
    assert [s for s, _ in a] == [s for s, _ in b] == list(range(1, 9))
    for (s, x), (_, y) in zip(a, b):
        assert x == y, (s, x, y)
    wa = torch.load(tmp_path / "straight/checkpoints/last.pt", weights_only=True)["model"]
    wb = torch.load(tmp_path / "chunked/checkpoints/last.pt", weights_only=True)["model"]
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
