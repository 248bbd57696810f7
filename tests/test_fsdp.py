"""run.parallel=fsdp (FSDP2) under torchrun on CPU (gloo, 2 processes): the same losses and
weights as one process on the global batch and as DDP, an exact resume from the sharded
checkpoint, the sharded checkpoint read as one file, and the pytorch#162338 probe."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mimlab.cli import run
from mimlab.core.config import ConfigError, PretrainConfig, resolve
from mimlab.io import checkpoint as ckpt_format

REPO = Path(__file__).resolve().parents[1]
WORKER = str(REPO / "tests/fsdp_worker.py")
TORCHRUN = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or shutil.which(
    "torchrun"
)
needs_torchrun = pytest.mark.skipif(TORCHRUN is None, reason="torchrun not found")


def _args(data, out, name, *extra):
    return [
        "pretrain",
        f"--data={data}",
        f"--out={out}",
        f"--name={name}",
        "model.preset=micro",
        "data.limit=64",
        "optim.epochs=2",
        "run.log_every=1",
        "run.progress=false",
        "data.num_workers=0",
        "run.device=cpu",
        *extra,
    ]


def _launch(args, nproc):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    head = [TORCHRUN, "--standalone", f"--nproc_per_node={nproc}"] if nproc > 1 else []
    cmd = [*head, WORKER, *args] if nproc > 1 else [sys.executable, WORKER, *args]
    p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]


def _rows(d):
    rows = [json.loads(l) for l in (d / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "images_per_s"} for r in rows]


def _losses(d):
    return [r["loss"] for r in _rows(d) if r["kind"] == "train"]


@pytest.mark.slow
@needs_torchrun
def test_fsdp_matches_one_process_and_resumes_exactly(cifar_dir, tmp_path):
    fsdp = ("optim.batch_size=8", "run.parallel=fsdp")
    _launch(_args(cifar_dir, tmp_path, "single", "optim.batch_size=16"), 1)
    _launch(_args(cifar_dir, tmp_path, "fsdp", *fsdp), 2)
    single, sharded = tmp_path / "single", tmp_path / "fsdp"
    res = json.loads((sharded / "results.json").read_text())
    assert res["world_size"] == 2 and res["steps"] == 8
    assert res["checkpoint"].endswith("checkpoints/last.dcp")
    assert sorted(p.name for p in (sharded / "checkpoints/last.dcp").glob("*.distcp")) == [
        "__0_0.distcp",
        "__1_0.distcp",
    ]  # each rank wrote its shards
    a, b = _losses(single), _losses(sharded)
    assert len(a) == len(b) == 8
    assert max(abs(x - y) for x, y in zip(a, b)) < 1e-5, (a, b)
    wa = ckpt_format.read(single / "checkpoints/last.pt")["model"]
    ck = ckpt_format.read(sharded / "checkpoints/last.dcp")  # the shards as one checkpoint
    assert ck["global_step"] == 8 and ck["world_size"] == 2
    assert set(wa) == set(ck["model"]) and set(ck["encoder"]) == {
        k[len("encoder.") :] for k in wa if k.startswith("encoder.")
    }
    worst = max((wa[k] - ck["model"][k]).abs().max().item() for k in wa)
    assert worst < 1e-5, worst
    # one mimlab checkpoint file, and `mimlab export` reading the directory directly
    dcp = str(sharded / "checkpoints/last.dcp")
    assert run(["export", dcp, str(tmp_path / "one.pt"), "--format=mimlab"]) == 0
    back = ckpt_format.load(tmp_path / "one.pt")
    assert back["kind"] == "pretrain" and back["global_step"] == 8
    assert all(torch.equal(back["model"][k], ck["model"][k]) for k in wa)
    two = ckpt_format.load(ckpt_format.consolidate(dcp, tmp_path / "two.pt"))
    assert all(torch.equal(two["encoder"][k], back["encoder"][k]) for k in ck["encoder"])
    assert run(["export", str(sharded / "checkpoints/last.dcp"), str(tmp_path / "e.pt")]) == 0
    # exact resume from the sharded checkpoint: stop after step 3 (mid-epoch), resume
    _launch(_args(cifar_dir, tmp_path, "split", *fsdp, "run.stop_at_step=3"), 2)
    assert [r["step"] for r in _rows(tmp_path / "split")] == [1, 2, 3]
    _launch(_args(cifar_dir, tmp_path, "split", *fsdp, "run.resume=auto"), 2)
    assert _rows(tmp_path / "split") == _rows(sharded)  # every logged field, bitwise
    wb = ckpt_format.read(tmp_path / "split/checkpoints/last.dcp")["model"]
    assert all(torch.equal(ck["model"][k], wb[k]) for k in wb)


@pytest.mark.slow
@needs_torchrun
def test_fsdp_ema_target_and_checkpointing_match_ddp(cifar_dir, tmp_path):
    """data2vec: an EMA target (frozen, sharded as its own unit like the online encoder),
    block masking and activation checkpointing of every block (recomputed inside the block's
    FSDP unit); FSDP and DDP draw the same masks on each rank, so they must agree."""
    ex = (
        "method.name=data2vec",
        "optim.batch_size=8",
        "optim.epochs=1",
        "model.grad_checkpointing=full",
    )
    _launch(_args(cifar_dir, tmp_path, "ddp", *ex), 2)
    _launch(_args(cifar_dir, tmp_path, "fsdp", *ex, "run.parallel=fsdp"), 2)
    a, b = _losses(tmp_path / "ddp"), _losses(tmp_path / "fsdp")
    assert len(a) == 4 and max(abs(x - y) for x, y in zip(a, b)) < 1e-5, (a, b)
    wa = ckpt_format.read(tmp_path / "ddp/checkpoints/last.pt")["model"]
    wb = ckpt_format.read(tmp_path / "fsdp/checkpoints/last.dcp")["model"]
    ema = [k for k in wa if k.startswith("target.ema.")]
    assert ema and set(wa) == set(wb)
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) < 1e-5


@pytest.mark.slow
@needs_torchrun
@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_nonfinite_loss_on_one_rank_skips_the_step_everywhere(cifar_dir, tmp_path, parallel):
    """A NaN loss on rank 1 only (its 3rd micro-batch) drops that optimizer step's update on
    both ranks, without a host read in the loop (the flag is max-reduced on the device): the
    weights after step 3 equal those after step 2, and the replicas stay identical."""
    ex = (
        "optim.batch_size=8",
        "optim.epochs=1",
        "run.nonfinite_skip=1",
        f"run.parallel={parallel}",
    )
    os.environ["NAN_AT"] = "1:3"
    try:
        for stop in (2, 3):
            _launch(_args(cifar_dir, tmp_path, f"s{stop}", *ex, f"run.stop_at_step={stop}"), 2)
    finally:
        del os.environ["NAN_AT"]
    suffix = "dcp" if parallel == "fsdp" else "pt"
    a, b = (ckpt_format.read(tmp_path / f"s{s}/checkpoints/last.{suffix}") for s in (2, 3))
    assert a["nonfinite_skipped"] == 0 and b["nonfinite_skipped"] == 1
    assert b["global_step"] == 3
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    if parallel == "ddp":
        res = json.loads((tmp_path / "s3/results.json").read_text())
        assert res["ddp_max_param_divergence"] == 0.0


@pytest.mark.parametrize("result,ok", [(1.5, True), (3.0, False)])
def test_gloo_avg_reduce_scatter_probe(monkeypatch, result, ok):
    """pytorch#162338: an AVG reduce-scatter that sums (3.0 = 1 + 2 instead of 1.5) stops an
    FSDP run before training (the real gloo is probed by every run.parallel=fsdp run above)."""
    import torch.distributed as tdist

    from mimlab.core import dist
    from mimlab.train import fsdp

    monkeypatch.setattr(dist, "is_dist", lambda: True)
    monkeypatch.setattr(dist, "world_size", lambda: 2)
    monkeypatch.setattr(dist, "rank", lambda: 0)
    monkeypatch.setattr(tdist, "get_backend", lambda: "gloo")
    seen = []

    def fake(out, inp, op=None):
        seen.append((inp.tolist(), op))
        out.fill_(result)

    monkeypatch.setattr(tdist, "reduce_scatter_tensor", fake)
    if ok:
        fsdp.check_gloo_avg_reduce_scatter()
    else:
        with pytest.raises(RuntimeError, match="162338"):
            fsdp.check_gloo_avg_reduce_scatter()
    assert seen == [([1.0, 1.0], tdist.ReduceOp.AVG)]


def test_parallel_option_is_checked():
    with pytest.raises(ConfigError, match="run.parallel must be ddp | fsdp"):
        resolve(PretrainConfig, overrides=["run.parallel=zero3"])
