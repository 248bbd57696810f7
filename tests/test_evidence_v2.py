"""Evidence suite, protocol v2: the committed protocol, pilot P1's budget rule, fine-tuning
curves (finetune.eval_at) and the settings adapted to the budget (MoCo v3 crops once, the
MaskDistill teacher's pre-activation map)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
import yaml
from conftest import make_imagefolder, micro_pretrain_cfg

from mimlab import tasks
from mimlab.core.config import FinetuneConfig
from mimlab.experiments.evidence import ftbudget
from mimlab.experiments.evidence.protocol import (
    PROTOCOL,
    ProtocolMismatch,
    check_committed,
    write_protocol,
)
from mimlab.nn.teachers import EfficientNetLite0Teacher

REPO = Path(__file__).resolve().parents[1]


def test_committed_protocol_is_the_codes():
    """docs/results/standard/protocol.json is what protocol.py says, with the fields the issue
    asks for (every arm that enters a verdict has >= 3 pretraining runs)."""
    committed = check_committed(REPO / "docs/results/standard")
    assert committed["version"] == 2
    assert all(n >= 3 for n in committed["pretrain_runs"].values())
    for key in ("ft_epochs", "test_statistic", "margin", "multiplicity"):
        assert key in committed


def test_a_changed_or_missing_protocol_stops_the_stages(tmp_path):
    with pytest.raises(ProtocolMismatch, match="missing"):
        check_committed(tmp_path)
    path = write_protocol(tmp_path)
    assert check_committed(tmp_path) == json.loads(path.read_text())
    changed = {**PROTOCOL, "random_init_ft_seeds": 5}
    path.write_text(json.dumps(changed))
    with pytest.raises(ProtocolMismatch, match="differs"):
        check_committed(tmp_path)


def _write(out: Path, name: str, top1: float) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps({"top1": top1}))


def test_budget_rule(tmp_path):
    out = tmp_path / "ftbudget"
    assert ftbudget.choose_budget(out)["decided"] is False
    _write(out, "random-e20", 60.0)
    _write(out, "random-e60", 62.0)  # 2 points short of the 3x budget: 20 fails
    r = ftbudget.choose_budget(out)
    assert r["ft_epochs"] == 20 and not r["plateau_reached"] and r["gap_at_chosen"] == 2.0
    _write(out, "random-e60", 61.0)  # within 1.2: 20 passes, 10 still to measure
    assert ftbudget.choose_budget(out)["decided"] is False
    _write(out, "random-e10", 55.0)
    _write(out, "random-e30", 60.5)
    r = ftbudget.choose_budget(out)
    assert r["ft_epochs"] == 20 and r["plateau_reached"]
    _write(out, "random-e10", 59.5)
    assert ftbudget.choose_budget(out)["ft_epochs"] == 10


def test_pilot_recipe_overrides():
    from mimlab.experiments.evidence.runner import ft_overrides

    ov = ft_overrides(PROTOCOL, 20, None, holdout=True)
    assert {"data.holdout=0.2", "optim.layer_decay=1.0", "model.preset=mini"} <= set(ov)
    assert {"finetune.mixup=0.8", "finetune.cutmix=1.0", "optim.warmup_epochs=1"} <= set(ov)
    ov = ft_overrides(PROTOCOL, 60, "ck.pt", holdout=False)
    assert {"optim.warmup_epochs=3", "optim.layer_decay=0.75", "finetune.pretrained=ck.pt"} <= set(
        ov
    )
    assert not any(o.startswith("data.holdout") for o in ov)


def test_pilot_runs_on_the_held_out_split(tmp_path, monkeypatch):
    """P1's fine-tunes train on 80 % of the pool and are scored on the held-out 20 % (never
    on test), along their schedule; MAE's run is pretrained once, on demand."""
    from mimlab.experiments.evidence.runner import Runner

    monkeypatch.setattr(ftbudget, "SCHEDULES", (("random", 2), ("mae", 2)))
    data = make_imagefolder(tmp_path / "data", classes=3, per_class=20)
    r = Runner(_toy_protocol(), str(data), tmp_path / "runs", tmp_path / "res", workers=0)
    assert set(ftbudget.run_ftbudget(r)["held_out_top1"]) == {"random-e2"}  # stage ftbudget
    summary = ftbudget.run_ftbudget(r, ("mae",))  # stage ftbudget-mae
    assert set(summary["held_out_top1"]) == {"random-e2", "mae-e2"}
    assert summary["decided"] is False  # the rule needs the 20- and 60-epoch schedules
    ft = json.loads((tmp_path / "res/v2/ftbudget/mae-e2.json").read_text())
    # a class-balanced 20 % of the 48-image pool (3 of each class's 16)
    assert ft["val_images"] == 9 and ft["train_images"] == 39
    assert [e for e, _ in ft["curve"]] == [1, 2] and "correct" not in ft
    assert (tmp_path / "res/v2/ftbudget/pretrain/mae-s0.json").is_file()


def _ft(data, out, name, *extra):
    ov = [
        f"data.path={data}",
        "model.preset=micro",
        "data.limit=64",
        "data.holdout=0.25",
        "optim.epochs=3",
        "optim.batch_size=16",
        "data.num_workers=0",
        "run.progress=false",
        f"run.out_dir={out}",
        f"run.name={name}",
        *extra,
    ]
    return tasks.finetune(tasks.resolve_run_config(FinetuneConfig, overrides=ov))


def test_eval_at_records_a_curve_without_changing_the_run(tmp_path):
    data = make_imagefolder(tmp_path / "data", classes=3, per_class=22)
    a = _ft(data, tmp_path, "curve", "finetune.eval_at=[1,2]")
    b = _ft(data, tmp_path, "plain")
    assert [e for e, _ in a["curve"]] == [1, 2, 3]
    assert a["curve"][-1][1] == pytest.approx(a["top1"], abs=1e-3)
    assert [e for e, _ in b["curve"]] == [3]
    # the evaluations draw no numbers from the training's random stream
    assert a["correct"] == b["correct"]
    assert _train_losses(a) == _train_losses(b) and _train_losses(a)


def _train_losses(res: dict) -> list:
    with open(Path(res["run_dir"]) / "metrics.csv") as f:
        return [r["loss"] for r in csv.DictReader(f) if r.get("kind") == "train"]


def test_mocov3_crops_once(tmp_path):
    data = make_imagefolder(tmp_path / "data", classes=3, per_class=16)
    cfg = micro_pretrain_cfg(data, tmp_path, "moco", "method.name=mocov3", "optim.epochs=1")
    res = tasks.pretrain(cfg)
    saved = yaml.safe_load((Path(res["run_dir"]) / "config.yaml").read_text())
    assert saved["data"]["crop_scale"] == [1.0, 1.0] and saved["data"]["hflip"] is False
    mae = micro_pretrain_cfg(data, tmp_path, "mae", "optim.epochs=1")
    assert mae.data.crop_scale != [1.0, 1.0]  # methods without their own crops keep the loader's


def test_effnet_head_preact_is_the_head_before_its_activation():
    norm = dict(student_mean=(0.5,) * 3, student_std=(0.5,) * 3, teacher_size=64)
    head = EfficientNetLite0Teacher("head", **norm)
    pre = EfficientNetLite0Teacher("head_preact", **norm)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        h, p = head.features(head.preprocess(x)), pre.features(pre.preprocess(x))
    assert torch.allclose(torch.nn.functional.relu6(p), h, atol=1e-5)
    assert (p < 0).float().mean() > 0.2  # what the activation zeroed is kept


def _toy_protocol() -> dict:
    p = json.loads(json.dumps(PROTOCOL))
    p.update(model="micro", random_init_ft_seeds=2)
    p["pool"]["images"] = 48
    p["pretrain"].update(epochs=1, batch=16, steps=3)
    p["pretrain_runs"] = {k: 2 for k in p["pretrain_runs"]}
    p["ft_epochs"]["value"] = 2
    p["ft_eval_at_epochs"] = [1]
    p["cka"].update(images=12, bootstrap_resamples=20)
    p["psnr"].update(images=8)
    return p


def test_a_stage_end_to_end_gives_a_verdict_from_its_files(tmp_path):
    """The core stage on a toy protocol: every unit is fine-tuned (curve on test) and probed,
    claim (a) gets a verdict from the result files alone, at the end and along the budget."""
    from mimlab.experiments.evidence.runner import EvidenceError, Runner
    from mimlab.experiments.evidence.verdicts import judge

    p = _toy_protocol()
    data = make_imagefolder(tmp_path / "data", classes=3, per_class=16)
    res = tmp_path / "results"
    r = Runner(p, str(data), tmp_path / "runs", res, workers=0)
    assert judge(res, p, "a")["verdict"] == "not measured"
    r.run_stage("core", ("mae",))
    files = sorted(str(f.relative_to(res / "v2")) for f in (res / "v2").rglob("*.json"))
    assert files == sorted(
        f"core/{k}/{arm}-s{s}.json"
        for k in ("ft", "lp_cls", "knn", "pretrain", "cka", "psnr")
        for arm in ("mae", "random")
        for s in (0, 1)
        if not (k in ("pretrain", "psnr") and arm == "random")
    )
    sup = json.loads((res / "v2/core/ft/random-s0.json").read_text())["cka"]
    assert sup["images"] == 12 and sup["boot_lo"] <= sup["cka"] <= sup["boot_hi"]
    assert "cka" not in json.loads((res / "v2/core/ft/mae-s0.json").read_text())
    rw = json.loads((res / "v2/core/cka/random-s1.json").read_text())
    assert rw["model"] == "random-micro-s1" and rw["ratio"] == 0.75
    ps = json.loads((res / "v2/core/psnr/mae-s0.json").read_text())
    assert ps["psnr"] == ps["psnr_visible_stats"] and ps["images"] == 8
    ft = json.loads((res / "v2/core/ft/mae-s0.json").read_text())
    assert [e for e, _ in ft["curve"]] == [1, 2] and ft["protocol"] == 2
    j = judge(res, p, "a")
    assert j["verdict"] in ("reproduced", "not reproduced", "undecided")
    d = j["tests"][0]["diff"]
    assert len(d["a_units"]) == 2 and len(d["b_units"]) == 2 and d["lo"] <= d["mean"] <= d["hi"]
    early = judge(res, p, "a", at=1)["tests"][0]["diff"]
    assert early["a_units"] == [
        json.loads((res / f"v2/core/ft/mae-s{s}.json").read_text())["curve"][0][1] for s in (0, 1)
    ]
    p["ft_epochs"]["value"] = None
    with pytest.raises(EvidenceError, match="ft_epochs"):
        Runner(p, str(data), tmp_path / "runs2", tmp_path / "r2").finetune("core", "mae", 0)


def test_claim_k_reads_the_shape_bias_each_fine_tune_recorded(tmp_path):
    """Claim (k) compares the shape bias the fine-tunes recorded (finetune.shape_bias), in
    points, with the run as the unit."""
    from mimlab.experiments.evidence.verdicts import judge, values

    p = _toy_protocol()
    for arm, base in (("random", 0.30), ("mae", 0.45), ("maskdistill", 0.50), ("cmae", 0.31)):
        for s in (0, 1):
            stage = {"random": "core", "mae": "core", "maskdistill": "augment"}.get(
                arm, "contrastive"
            )
            f = tmp_path / "v2" / stage / "ft" / f"{arm}-s{s}.json"
            f.parent.mkdir(parents=True, exist_ok=True)
            f.write_text(json.dumps({"top1": 50.0, "shape_bias": {"shape_bias": base + 0.01 * s}}))
    assert values(tmp_path, p, "mae", "shape_bias") == pytest.approx([45.0, 46.0])
    j = judge(tmp_path, p, "k")
    assert [t["a"] for t in j["tests"]] == ["mae", "maskdistill", "cmae"]
    assert j["tests"][0]["diff"]["mean"] == pytest.approx(15.0)
    assert j["verdict"] == "undecided"  # C-MAE's +1 point over 2 runs is not decided


def test_small_data_early_stop_and_full_budget(tmp_path):
    """A small-data arm's run is stopped at 1/8 .. all of the step budget, each point scored by
    k-NN on the held-out part of the pool; its fine-tune starts from the best point, and a
    second fine-tune from the full budget is kept beside it."""
    from mimlab.experiments.evidence.runner import Runner

    p = _toy_protocol()
    p["pretrain"].update(steps=8, epochs=1, batch=16)
    data = make_imagefolder(tmp_path / "data", classes=3, per_class=16)
    r = Runner(p, str(data), tmp_path / "runs", tmp_path / "res", workers=0)
    es = r.early_stop("smalldata", "mae_n10", 0)
    assert sorted(es["held_out_knn"]) == [1, 2, 4, 8] and es["budget_steps"] == 8
    assert es["best_step"] in es["held_out_knn"] and Path(es["checkpoint"]).is_file()
    assert Path(es["checkpoint"]).name == f"step{es['best_step']}.pt"
    primary = r.finetune("smalldata", "mae_n10", 0)
    full = r.finetune("smalldata", "mae_n10", 0, full_budget=True)
    assert primary["pretrained"] == es["checkpoint"]
    assert full["pretrained"].endswith("checkpoints/last.pt")
    pre = json.loads((tmp_path / "res/v2/smalldata/pretrain/mae_n10-s0.json").read_text())
    assert pre["steps"] == 8


def test_an_interrupted_fine_tune_resumes_with_its_whole_curve(tmp_path):
    """The suite's fine-tunes resume (run.resume=auto): a run stopped after epoch 2 and resumed
    reports the evaluations made before the stop too, equal to an uninterrupted run's."""
    data = make_imagefolder(tmp_path / "data", classes=3, per_class=22)
    straight = _ft(data, tmp_path, "straight", "finetune.eval_at=[1,2]")
    steps_per_epoch = straight["steps"] // 3
    _ft(
        data,
        tmp_path,
        "chunked",
        "finetune.eval_at=[1,2]",
        f"run.stop_at_step={2 * steps_per_epoch}",
        "run.resume=auto",
    )
    resumed = _ft(data, tmp_path, "chunked", "finetune.eval_at=[1,2]", "run.resume=auto")
    assert [e for e, _ in resumed["curve"]] == [1, 2, 3]
    assert resumed["curve"] == straight["curve"] and resumed["correct"] == straight["correct"]


def test_a_margin_needs_mae_and_random_init(tmp_path):
    """An '≈' sub-test's margin is a fraction of MAE's gain over random init: without MAE's
    runs the claim is 'not measured', not an error."""
    from mimlab.experiments.evidence.verdicts import judge

    p = _toy_protocol()
    for arm, stage in (
        ("random", "core"),
        ("rmae", "rmae"),
        ("rmae_indep", "rmae"),
        ("rmae_identity", "rmae"),
    ):
        for s in (0, 1):
            f = tmp_path / "v2" / stage / "ft" / f"{arm}-s{s}.json"
            f.parent.mkdir(parents=True, exist_ok=True)
            f.write_text(json.dumps({"top1": 40.0 + s}))
    j = judge(tmp_path, p, "b")
    assert j["verdict"] == "not measured" and any("margin" in m for m in j["missing"])
    assert j["waiting"]["mae"] == {"have": 0, "need": 2, "metrics": ["ft", "psnr"]}
    for s in (0, 1):
        f = tmp_path / "v2/core/ft" / f"mae-s{s}.json"
        f.write_text(json.dumps({"top1": 50.0 + s}))
    j = judge(tmp_path, p, "b")
    assert j["verdict"] == "not measured" and any("psnr" in m for m in j["missing"])
    for arm, stage, db in (("mae", "core", 22.0), ("rmae", "rmae", 23.0)):
        for s in (0, 1):
            f = tmp_path / "v2" / stage / "psnr" / f"{arm}-s{s}.json"
            f.parent.mkdir(parents=True, exist_ok=True)
            f.write_text(json.dumps({"psnr": db + 0.1 * s}))
    j = judge(tmp_path, p, "b")
    assert j["verdict"] == "not reproduced"  # R-MAE 10 points below MAE, margin 2
    assert j["tests"][0]["margin"] == pytest.approx(0.2 * 10.0)
    assert j["tests"][0]["outcome"] == "refutes (rmae below mae beyond the margin)"
    assert j["tests"][3]["outcome"] == "supports"  # PSNR +1.0 dB, effect margin 0.375
    psnr = j["tests"][3]
    assert psnr["metric"] == "psnr" and psnr["margin"] == pytest.approx(0.25 * 1.5)
    assert psnr["diff"]["mean"] == pytest.approx(1.0)
    from mimlab.experiments.evidence.report import write_report

    text = write_report(tmp_path, p).read_text()
    assert "rmae vs mae (ft, ≈ ±2) -10.00 [" in text
    assert "]: refutes (rmae below mae beyond the margin)" in text
    assert "rmae vs mae (psnr, effect ≥ 0.375) +1.00 [" in text


def test_no_gain_of_mae_leaves_an_approx_claim_not_measured(tmp_path):
    """MAE level with random init gives an '≈' margin of 0 (a fraction of no gain): the claim
    is 'not measured', saying why, instead of raising (seen at the smoke profile's epoch 1)."""
    from mimlab.experiments.evidence.verdicts import judge

    p = _toy_protocol()
    for arm, stage in (("random", "core"), ("mae", "core"), ("cmae", "contrastive")):
        for s in (0, 1):
            f = tmp_path / "v2" / stage / "ft" / f"{arm}-s{s}.json"
            f.parent.mkdir(parents=True, exist_ok=True)
            f.write_text(json.dumps({"top1": 40.0 + s}))
            f = tmp_path / "v2" / stage / "lp_cls" / f"{arm}-s{s}.json"
            f.parent.mkdir(parents=True, exist_ok=True)
            f.write_text(json.dumps({"top1": 30.0 + s}))
    j = judge(tmp_path, p, "c")
    assert j["verdict"] == "not measured"
    assert j["missing"] == ["the margin of cmae vs mae: MAE's gain over random init is 0"]
    assert j["notes"] == j["missing"] and j["waiting"] == {}


def test_claim_e_reads_supervised_cka_from_random_inits_fine_tunes(tmp_path):
    """Claim (e)'s 'supervised' units are random init's fine-tunes (their recorded CKA); the
    pretrained arms' units are their CKA files; the effect margin is the protocol's."""
    from mimlab.experiments.evidence.verdicts import judge, values

    p = _toy_protocol()
    files = {
        "core/ft/random": lambda s: {"top1": 40.0, "cka": {"cka": 0.80 + 0.01 * s}},
        "core/cka/mae": lambda s: {"cka": 0.95 + 0.001 * s},
        "contrastive/cka/mocov3": lambda s: {"cka": 0.90 + 0.002 * s},
        "contrastive/cka/cmae": lambda s: {"cka": 0.97 + 0.001 * s},
    }
    for stem, fn in files.items():
        for s in (0, 1):
            f = tmp_path / "v2" / f"{stem}-s{s}.json"
            f.parent.mkdir(parents=True, exist_ok=True)
            f.write_text(json.dumps(fn(s)))
    assert values(tmp_path, p, "supervised", "cka") == pytest.approx([0.80, 0.81])
    j = judge(tmp_path, p, "e")
    assert [t["margin"] for t in j["tests"]] == [p["cka"]["min_effect"]] * 3
    assert [t["diff"]["mean"] for t in j["tests"]] == pytest.approx([0.0495, 0.1455, 0.0695])
    assert j["verdict"] in ("reproduced", "undecided")  # every difference is positive


def test_small_arms_draw_their_images_per_run_and_supervised_is_a_fine_tune(tmp_path):
    from mimlab.experiments.evidence.arms import ARMS
    from mimlab.experiments.evidence.runner import Runner, small_overrides

    ov = small_overrides(ARMS["mae_n1000_perclass"], 624, 128, 1.0, 8, seed=2)
    assert "data.subset=one_per_class" in ov and "data.subset_seed=2" in ov
    p = _toy_protocol()
    data = make_imagefolder(tmp_path / "data", classes=3, per_class=16)
    r = Runner(p, str(data), tmp_path / "runs", tmp_path / "res", workers=0)
    ck = r.checkpoint("bench1000", "supervised_n1000", 0)
    rec = json.loads((tmp_path / "res/v2/bench1000/pretrain/supervised_n1000-s0.json").read_text())
    assert Path(ck).is_file() and rec["train_images"] == 3 * 16  # every image (1,000 > pool)
    assert "top1" in rec


def _fake_clock(monkeypatch) -> list:
    """wall.py's clock, advanced by hand: [seconds]."""
    import types

    from mimlab.experiments.evidence import wall

    clock = [0.0]
    monkeypatch.setattr(wall, "time", types.SimpleNamespace(time=lambda: clock[0]))
    return clock


def test_wall_time_adds_up_the_attempts_of_an_interrupted_sub_run(tmp_path, monkeypatch):
    """A killed attempt leaves its heartbeat; the next attempt reports both (a hand-advanced
    clock: no timing)."""
    import time as _time

    from mimlab.experiments.evidence.wall import timed

    clock = _fake_clock(monkeypatch)
    side = tmp_path / ".wall" / "x.txt"

    def killed():
        clock[0] += 100.0
        for _ in range(2000):  # until the heartbeat has written it (a hang guard, no timing)
            if side.is_file() and side.read_text() == "100.0":
                break
            _time.sleep(0.005)
        raise KeyboardInterrupt  # the session ends mid-run

    with pytest.raises(KeyboardInterrupt):
        timed(side, killed, beat=0.01)
    assert float(side.read_text()) == 100.0  # the heartbeat kept the killed attempt

    def second():
        clock[0] += 30.0
        return {"ok": 1}

    res, now, total = timed(side, second, beat=0.01)
    assert res == {"ok": 1} and (now, total) == (30.0, 130.0) and not side.exists()


def test_a_sub_run_made_inside_another_counts_once(tmp_path, monkeypatch):
    """A fine-tune that makes its pretraining run first (a lazy checkpoint) leaves that run's
    time to the run's own file; the report's stage sum also corrects files written before
    (no ``wall_exclusive``), once per pretraining run, less its remakes."""
    from mimlab.experiments.evidence.report import _wall
    from mimlab.experiments.evidence.runner import Runner

    clock = _fake_clock(monkeypatch)
    r = Runner(_toy_protocol(), "unused", tmp_path / "runs", tmp_path / "res", workers=0)

    def pretrain():
        clock[0] += 100.0
        return {"final_loss": 0.5}

    def finetune():
        clock[0] += 10.0
        r.step("core/pretrain/mae-s0", pretrain)
        clock[0] += 20.0
        return {"top1": 50.0}

    ft = r.step("core/ft/mae-s0", finetune)
    pre = json.loads((tmp_path / "res/v2/core/pretrain/mae-s0.json").read_text())
    assert (ft["wall_seconds"], pre["wall_seconds"]) == (30.0, 100.0)
    assert ft["wall_exclusive"] and pre["wall_exclusive"]
    assert _wall(tmp_path / "res", "core") == "2.2 min (2 sub-runs finished)"

    old = tmp_path / "old" / "v2" / "core"  # written before: the fine-tune counts it too
    for kind, rec in (
        ("ft", {"top1": 50.0, "wall_seconds": 1000.0}),
        ("pretrain", {"wall_seconds": 300.0, "wall_seconds_last_attempt": 100.0, "remade": [{}]}),
    ):
        (old / kind).mkdir(parents=True)
        (old / kind / "mae-s0.json").write_text(json.dumps(rec))
    # made first in 200 s inside the fine-tune, remade later in 100 s: 800 + 300 s
    assert _wall(tmp_path / "old", "core") == "18.3 min (2 sub-runs finished)"


def test_a_lost_checkpoint_is_remade_and_checked_against_the_recorded_run(tmp_path, monkeypatch):
    """A pretraining checkpoint lost with its machine is remade; the result file records
    whether the remade run ends at the recorded final loss (the evidence that results made
    from the lost checkpoint still stand) and keeps the lost attempt's wall time."""
    from mimlab.experiments.evidence import runner as runner_mod

    losses = iter([0.61, 0.61, 0.70])

    def fake_pretrain(cfg):
        ck = Path(cfg.run.out_dir) / cfg.run.name / "last.pt"
        ck.parent.mkdir(parents=True, exist_ok=True)
        ck.write_bytes(b"x")
        return {"final_loss": next(losses), "checkpoint": str(ck)}

    monkeypatch.setattr(runner_mod.tasks, "pretrain", fake_pretrain)
    r = runner_mod.Runner(_toy_protocol(), str(tmp_path), tmp_path / "runs", tmp_path / "res")
    f = tmp_path / "res" / "v2" / "core" / "pretrain" / "mae-s0.json"
    ck = r.checkpoint("core", "mae", 0)
    first = json.loads(f.read_text())
    assert "remade" not in first and r.checkpoint("core", "mae", 0) == ck  # kept: not remade
    Path(ck).unlink()
    assert Path(r.checkpoint("core", "mae", 0)).is_file()
    again = json.loads(f.read_text())
    assert again["remade"] == [
        {
            "metric": "final_loss",
            "recorded": 0.61,
            "remade": 0.61,
            "same": True,
            "wall_seconds": again["wall_seconds_last_attempt"],  # the remake's own time
        }
    ]
    assert again["wall_seconds"] >= first["wall_seconds"] + again["wall_seconds_last_attempt"]
    Path(ck).unlink()
    r.checkpoint("core", "mae", 0)
    third = json.loads(f.read_text())["remade"]
    assert len(third) == 2 and third[1]["same"] is False and third[1]["remade"] == 0.70


def test_report_shows_progress_one_unit_cells_and_the_curves_figure(tmp_path):
    """Before a claim has all its units the report says which are missing; an arm with one
    unit shows no spread; the fine-tuning curves are drawn, one panel per stage."""
    from mimlab.experiments.evidence.figures import ft_curves
    from mimlab.experiments.evidence.report import write_report

    p = _toy_protocol()
    for arm, seeds in (("random", (0, 1)), ("mae", (0,))):
        for s in seeds:
            f = tmp_path / "v2" / "core" / "ft" / f"{arm}-s{s}.json"
            f.parent.mkdir(parents=True, exist_ok=True)
            f.write_text(
                json.dumps(
                    {"top1": 50.0 + s, "curve": [[1, 40.0 + s], [2, 50.0 + s]], "wall_seconds": 60}
                )
            )
    assert ft_curves(tmp_path, p) == {
        "random": [[(1, 40.0), (2, 50.0)], [(1, 41.0), (2, 51.0)]],
        "mae": [[(1, 40.0), (2, 50.0)]],
    }
    text = write_report(tmp_path, p).read_text()
    assert "units so far: mae 1/2 (ft)" in text
    assert "| 50.00 (1) |" in text and "50.50 ± 0.71 (2)" in text and "nan" not in text
    assert "- `core`: 3.0 min (3 sub-runs finished)" in text and "- `rmae`: not started" in text
    png = tmp_path / "v2" / "ft_curves.png"
    assert "](ft_curves.png)" in text and png.read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize(
    "kind, a, refuted, expected",
    [
        (">", [0.0, 1.0, 2.0], True, "refutes (x below y)"),
        ("<", [4.0, 5.0, 6.0], True, "refutes (x above y)"),
        ("~", [5.0, 6.0, 7.0], True, "refutes (x above y beyond the margin)"),
        (">=", [-3.0, -2.0, -1.0], True, "refutes (x below y beyond the margin)"),
        ("effect", [2.0, 3.0, 4.0], True, "refutes (an effect smaller than the margin)"),
        (">", [13.0, 14.0, 15.0], False, "supports"),
        (">", [3.0, 4.0, 5.0], False, "undecided; about 17 units per arm would decide it"),
        (">", [2.0, 3.0, 4.0], False, "undecided; more than 100 units per arm would decide it"),
    ],
)
def test_a_judged_sub_test_says_which_way_it_fails(kind, a, refuted, expected):
    """Refuted sub-tests say which way; undecided ones how many units per arm would decide
    them (B = 2, 3, 4 against A; margin 1; a difference of 1 at sd 1 needs 17 per arm, about
    2 (1.96 + 0.84)^2 = 15.7 with the normal approximation, a little more with t)."""
    from mimlab.core.stats import subtest, welch
    from mimlab.experiments.evidence.verdicts import outcome

    d = welch(a, [2.0, 3.0, 4.0])
    row = {"a": "x", "b": "y", "diff": d.to_dict(), **subtest(d, kind, 1.0)}
    assert outcome(row, refuted, alpha=0.025).startswith(expected)


def test_units_for_power_gives_about_the_power_it_promises():
    """Simulated experiments at the planned number of units per arm, with the observed
    difference and spreads as the truth, decide their sub-test in about 80 % of cases, and
    clearly fewer with a third of the units."""
    import numpy as np

    from mimlab.core.stats import subtest, units_for_power, welch

    rng = np.random.default_rng(0)
    for kind, delta, sa, sb, margin in ((">", 1.0, 1.0, 1.0, 0.0), ("~", 0.3, 1.0, 1.0, 1.0)):
        observed = welch([delta - sa, delta, delta + sa], [-sb, 0.0, sb])
        n = units_for_power(observed, kind, margin)
        assert n is not None and n > 6

        def rate(k: int) -> float:
            hits = 0
            for _ in range(1000):
                t = subtest(welch(rng.normal(delta, sa, k), rng.normal(0, sb, k)), kind, margin)
                hits += t["p_support"] < 0.025 or t["p_refute"] < 0.025
            return hits / 1000

        assert 0.74 <= rate(n) <= 0.88, (kind, n)
        assert rate(n // 3) < 0.6, (kind, n)
    assert units_for_power(welch([1.0, 2.0, 3.0], [1.0, 2.0, 3.0]), ">") is None  # on the boundary


def test_a_second_remake_keeps_the_first_made_time(tmp_path):
    """A pretraining file remade once before remakes recorded their time (its last attempt was
    that remake) and remade again: the first making's time stays recoverable."""
    from mimlab.experiments.evidence.report import _first_made
    from mimlab.experiments.evidence.runner import Runner

    r = Runner(_toy_protocol(), "unused", tmp_path / "runs", tmp_path / "res", workers=0)
    old = {
        "final_loss": 0.6,
        "wall_seconds": 300.0,
        "wall_seconds_last_attempt": 100.0,
        "remade": [{"metric": "final_loss", "recorded": 0.6, "remade": 0.6, "same": True}],
    }
    new = r._remade("core/pretrain/mae-s0", old, {"final_loss": 0.6, "wall_seconds": 50.0})
    assert [x["wall_seconds"] for x in new["remade"]] == [100.0, 50.0]
    assert new["wall_seconds"] == 350.0 and _first_made(new) == 200.0
