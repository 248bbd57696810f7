import json
import math

import pytest
import torch
from conftest import micro_pretrain_cfg

from mimlab import tasks
from mimlab.core.config import PretrainConfig, resolve
from mimlab.methods import build_method
from mimlab.train.engine import NonFiniteLossError, TrainingError, atomic_save, lr_at, param_groups


def test_lr_schedule_warmup_and_cosine():
    peak, mn = 1e-3, 1e-5
    assert lr_at(0, 100, 10, peak, mn) == 0
    assert lr_at(5, 100, 10, peak, mn) == pytest.approx(peak / 2)
    assert lr_at(10, 100, 10, peak, mn) == pytest.approx(peak)
    assert lr_at(55, 100, 10, peak, mn) == pytest.approx(mn + (peak - mn) * 0.5)
    assert lr_at(100, 100, 10, peak, mn) == pytest.approx(mn)
    vals = [lr_at(s, 100, 10, peak, mn) for s in range(10, 101)]
    assert all(a >= b for a, b in zip(vals, vals[1:]))


def test_no_weight_decay_on_norms_biases_tokens():
    cfg = resolve(PretrainConfig, overrides=["model.preset=micro"])
    m = build_method(cfg)
    groups = param_groups(m, 0.05, m.no_weight_decay())
    wd = {n: g["weight_decay"] for g in groups for n in g["names"]}
    assert wd["encoder.cls_token"] == 0 and wd["head.mask_token"] == 0
    assert wd["encoder.norm.weight"] == 0 and wd["encoder.blocks.0.attn.qkv.bias"] == 0
    assert wd["encoder.blocks.0.attn.qkv.weight"] == 0.05
    assert wd["encoder.patch_embed.proj.weight"] == 0.05
    assert "encoder.pos_embed" not in wd  # fixed sin-cos: a buffer, not trained


def test_layer_decay_scales():
    from mimlab.nn.models import ViTEncoder

    enc = ViTEncoder(32, 8, 3, 32, 3, 2)
    groups = param_groups(enc, 0.05, enc.no_weight_decay(), 0.5, enc.layer_id, enc.depth + 1)
    scale = {n: g["lr_scale"] for g in groups for n in g["names"]}
    assert scale["norm.weight"] == 1.0
    assert scale["blocks.2.mlp.fc1.weight"] == 0.5
    assert scale["blocks.0.mlp.fc1.weight"] == 0.125
    assert scale["patch_embed.proj.weight"] == 0.0625


def _cfg(data, out, name, *extra):
    return micro_pretrain_cfg(data, out, name, *extra)


def _losses(run_dir):
    rows = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in rows if r["kind"] == "train"]


@pytest.mark.parametrize("workers,accum", [(0, 1), (2, 2)])
def test_resume_matches_uninterrupted_run(cifar_dir, tmp_path, workers, accum):
    ex = [
        f"data.num_workers={workers}",
        f"optim.accum_steps={accum}",
        f"optim.batch_size={16 // accum}",
    ]
    full = tasks.pretrain(_cfg(cifar_dir, tmp_path, "full", *ex))
    tasks.pretrain(_cfg(cifar_dir, tmp_path, "split", *ex, "run.stop_at_step=4"))
    part = _losses(tmp_path / "split")
    assert [s for s, _ in part] == [1, 2, 3, 4]  # stopped mid-epoch (6 steps/epoch)
    tasks.pretrain(_cfg(cifar_dir, tmp_path, "split", *ex, "run.resume=auto"))
    a, b = _losses(tmp_path / "full"), _losses(tmp_path / "split")
    assert [s for s, _ in a] == [s for s, _ in b] == list(range(1, full["steps"] + 1))
    for (s, la), (_, lb) in zip(a, b):
        assert abs(la - lb) <= 1e-6, (s, la, lb)
    wa = torch.load(tmp_path / "full/checkpoints/last.pt", weights_only=True)["model"]
    wb = torch.load(tmp_path / "split/checkpoints/last.pt", weights_only=True)["model"]
    assert all(torch.allclose(wa[k], wb[k], atol=1e-6) for k in wa)


def test_run_dir_contents(cifar_dir, tmp_path):
    tasks.pretrain(_cfg(cifar_dir, tmp_path, "r", "optim.epochs=1", "run.ckpt_every=1"))
    d = tmp_path / "r"
    for f in (
        "config.yaml",
        "metrics.csv",
        "metrics.jsonl",
        "results.json",
        "log.txt",
        "checkpoints/last.pt",
        "checkpoints/checkpoint-epoch1.pt",
    ):
        assert (d / f).exists(), f
    assert list((d / "tb").glob("events.out.tfevents*"))
    ck = torch.load(d / "checkpoints/last.pt", weights_only=True)
    assert {
        "model",
        "optimizer",
        "scaler",
        "rng",
        "config",
        "provenance",
        "global_step",
        "samples_in_epoch",
        "format_version",
        "encoder",
        "data_stats",
    } <= set(ck)
    header = (d / "metrics.csv").read_text().splitlines()[0]
    assert "loss" in header and "lr" in header and "images_per_s" in header


class _NaNAfter(torch.nn.Module):
    def __init__(self, inner, after):
        super().__init__()
        self.inner, self.after, self.calls = inner, after, 0
        self.encoder = inner.encoder

    def forward(self, x, y=None):
        self.calls += 1
        out = self.inner(x, y)
        if self.calls > self.after:
            out["loss"] = out["loss"] * float("nan")
        return out


def test_nonfinite_loss_stops_with_step_and_hint(cifar_dir, tmp_path, monkeypatch):
    import mimlab.train.pretraining as T

    real = T.build_method
    monkeypatch.setattr(T, "build_method", lambda cfg, **kw: _NaNAfter(real(cfg, **kw), 3))
    with pytest.raises(NonFiniteLossError) as e:
        tasks.pretrain(_cfg(cifar_dir, tmp_path, "nan"))
    msg = str(e.value)
    assert "step 3" in msg and "lower" in msg and "last good checkpoint" in msg


def test_nonfinite_skip_budget(cifar_dir, tmp_path, monkeypatch):
    """A step with a non-finite loss keeps its place in the schedule but its update is a
    no-op: weights and AdamW state after it equal those before it (no host read needed)."""
    import mimlab.train.pretraining as T

    real = T.build_method

    class OneNaN(_NaNAfter):
        def forward(self, x, y=None):
            out = super().forward(x, y)
            if self.calls != 3:
                out["loss"] = self.inner(x, y)["loss"]
            return out

    monkeypatch.setattr(T, "build_method", lambda cfg, **kw: OneNaN(real(cfg, **kw), 2))
    ex = ("run.nonfinite_skip=1", "optim.epochs=1")
    res = tasks.pretrain(_cfg(cifar_dir, tmp_path, "skip", *ex))
    assert res["steps"] == 6 and math.isfinite(res["final_loss"])  # step 3 ran, not applied
    ck = torch.load(tmp_path / "skip/checkpoints/last.pt", weights_only=True)
    assert ck["nonfinite_skipped"] == 1
    cks = []
    for stop in (2, 3):  # before and after the step whose loss is NaN
        tasks.pretrain(_cfg(cifar_dir, tmp_path, f"s{stop}", *ex, f"run.stop_at_step={stop}"))
        cks.append(torch.load(tmp_path / f"s{stop}/checkpoints/last.pt", weights_only=True))
    before, after = cks
    assert after["global_step"] == 3 and after["nonfinite_skipped"] == 1
    assert all(torch.equal(before["model"][k], after["model"][k]) for k in before["model"])
    sa, sb = before["optimizer"]["state"], after["optimizer"]["state"]
    assert sa.keys() == sb.keys() and all(
        torch.equal(sa[i][f], sb[i][f]) for i in sa for f in ("step", "exp_avg", "exp_avg_sq")
    )


def test_atomic_save_keeps_previous_on_failure(tmp_path, monkeypatch):
    p = tmp_path / "ck.pt"
    atomic_save({"a": torch.ones(2)}, p)

    def boom(obj, f, *a, **k):
        with open(f, "wb") as fh:
            fh.write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", boom)
    with pytest.raises(TrainingError, match="previous checkpoint is intact"):
        atomic_save({"a": torch.zeros(2)}, p)
    monkeypatch.undo()
    assert torch.equal(torch.load(p, weights_only=True)["a"], torch.ones(2))
    assert not (tmp_path / "ck.pt.tmp").exists()


def test_fp16_uses_a_grad_scaler(cifar_dir, tmp_path):
    res = tasks.pretrain(_cfg(cifar_dir, tmp_path, "fp16", "run.precision=fp16", "optim.epochs=1"))
    assert math.isfinite(res["final_loss"])
    ck = torch.load(tmp_path / "fp16/checkpoints/last.pt", weights_only=True)
    assert ck["scaler"] and ck["scaler"]["scale"] > 0  # an enabled scaler has state
    res = tasks.pretrain(_cfg(cifar_dir, tmp_path, "fp32", "run.precision=fp32", "optim.epochs=1"))
    ck = torch.load(tmp_path / "fp32/checkpoints/last.pt", weights_only=True)
    assert not ck["scaler"]  # disabled scaler: empty state


class Opaque:  # an arbitrary pickled object: refused by weights_only loading
    pass


def test_checkpoints_load_weights_only_unless_trusted(tmp_path):
    from mimlab.train.engine import load_checkpoint

    p = tmp_path / "odd.pt"
    torch.save({"model": {}, "extra": Opaque()}, p)
    with pytest.raises(TrainingError, match="could not load checkpoint"):
        load_checkpoint(p)
    assert isinstance(load_checkpoint(p, trust=True)["extra"], Opaque)
