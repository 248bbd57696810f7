"""``mimlab reproduce --suite quick``: the evidence engine at the smoke profile runs every stage
end to end into --out (run directories and result files), resumes without new work, writes a
report with a verdict row per claim, and refuses a folder of other settings; the profiles
derive from protocol v2 without touching it; ``--suite standard`` is retired in one line."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from mimlab import cli
from mimlab.experiments.evidence.arms import ARMS, CLAIMS, STAGES
from mimlab.experiments.evidence.profiles import PROFILES, SUITES
from mimlab.experiments.evidence.protocol import PROTOCOL
from mimlab.experiments.evidence.suite import EvidenceError, reproduce_profile
from tests.conftest import make_imagefolder


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """One smoke run through the CLI (10 classes, 100 training images) and its files."""
    root = tmp_path_factory.mktemp("smoke")
    data = make_imagefolder(root / "data", classes=10, per_class=10)
    out = root / "out"
    rc = cli.run(["reproduce", "--suite", "quick", "--data", str(data), "--out", str(out)])
    return data, out, rc


def _result_files(out: Path) -> dict:
    return {
        str(f.relative_to(out)): (f.read_bytes(), f.stat().st_mtime_ns)
        for f in sorted((out / "v2").rglob("*.json"))
        if f.name != "summary.json"  # the report's own summary, rewritten with the report
    }


@pytest.mark.slow
def test_smoke_runs_every_stage_into_its_out_folder(smoke):
    data, out, rc = smoke
    assert rc == 0
    files = _result_files(out)
    # every arm of every stage: its pretraining run(s), fine-tunes and probes, 2 units each
    for arm in (a for arms, _ in STAGES.values() for a in arms):
        stage = next(s for s, (arms, _) in STAGES.items() if arm in arms)
        for kind in ("pretrain", "ft", "lp_cls", "knn"):
            for seed in (0, 1):
                assert f"v2/{stage}/{kind}/{arm}-s{seed}.json" in files, (kind, arm, seed)
    for path in (
        "v2/core/cka/mae-s1.json",  # CKA with its bootstrap interval
        "v2/core/psnr/mae-s1.json",  # PSNR
        "v2/smalldata/earlystop/mae_n10-s1.json",  # early stop of a small-data arm
        "v2/smalldata/ft/mae_n10-s1-full.json",  # and its full-budget fine-tune beside it
        "v2/bench1000/pretrain/supervised_n1000-s1.json",  # the supervised arm
        "v2/bench1000/ft/supervised_n1000-s1-lf0.1.json",  # 10 %-label fine-tune
        "v2/augment/teacher_targets.json",  # MaskDistill's target diversity
        "v2/contrastive/lrcheck/mocov3.json",  # pretraining-lr check
    ):
        assert path in files, path
    es = json.loads(files["v2/smalldata/earlystop/mae_n10-s1.json"][0])
    assert es["budget_steps"] == PROFILES["smoke"]()["pretrain"]["steps"]
    assert Path(es["checkpoint"]).is_relative_to(out / "runs")
    # the run directories are under --out too, and nothing was written beside the data
    assert (out / "runs" / "v2" / "core" / "pretrain" / "mae-s0").is_dir()
    assert sorted(p.name for p in data.iterdir()) == ["test", "train"]
    assert json.loads((out / "protocol.json").read_text())["profile"] == "smoke"


@pytest.mark.slow
def test_smoke_report_says_it_decides_nothing_with_a_row_per_claim(smoke):
    _, out, _ = smoke
    text = (out / "v2" / "report.md").read_text()
    assert "smoke profile: decides nothing" in text
    verdicts = text.split("## Verdicts\n")[1].split("\n## ")[0]
    for claim in CLAIMS:
        row = next(ln for ln in verdicts.splitlines() if ln.startswith(f"| ({claim}) "))
        assert row.rstrip().endswith("** |"), row  # the verdict cell, e.g. **undecided**
    # claim (a) has every unit at the smoke profile: a verdict from 2 MAE runs vs 2 FT seeds
    summary = json.loads((out / "v2" / "summary.json").read_text())
    assert summary["a"]["verdict"] in ("reproduced", "not reproduced", "undecided")
    diff = summary["a"]["tests"][0]["diff"]
    assert len(diff["a_units"]) == 2 and len(diff["b_units"]) == 2


@pytest.mark.slow
def test_a_second_call_does_no_new_work(smoke, capsys):
    data, out, _ = smoke
    before = _result_files(out)
    capsys.readouterr()
    report = reproduce_profile("smoke", str(data), str(out))
    assert "running" not in capsys.readouterr().out
    assert _result_files(out) == before  # same files, same bytes, not rewritten
    assert report == out / "v2" / "report.md"


@pytest.mark.slow
def test_a_folder_of_other_settings_is_refused(smoke, tmp_path):
    data, out, _ = smoke
    other = tmp_path / "other"
    other.mkdir()
    p = PROFILES["smoke"]()
    p["ft_epochs"]["value"] = 3
    (other / "protocol.json").write_text(json.dumps(p))
    with pytest.raises(EvidenceError, match="ft_epochs"):
        reproduce_profile("smoke", str(data), str(other))


def test_profiles_derive_from_protocol_v2_without_changing_it():
    before = copy.deepcopy(PROTOCOL)
    for name, make in PROFILES.items():
        p = make()
        assert p["profile"] == name and p["version"] == PROTOCOL["version"]
        assert set(p["pretrain_runs"]) == set(PROTOCOL["pretrain_runs"])
        pre = p["pretrain"]
        assert pre["steps"] == pre["epochs"] * (p["pool"]["images"] // pre["batch"])
        p["pretrain_runs"]["mae"] = 99  # a fresh copy: nothing leaks into PROTOCOL
    assert PROTOCOL == before and "profile" not in PROTOCOL
    assert SUITES == {"quick": "smoke", "full": "gpu"}
    gpu = PROFILES["gpu"]()
    assert gpu["model"] == "tiny" and gpu["pool"]["images"] == 50000
    assert min(gpu["pretrain_runs"].values()) >= 3 and gpu["ft_epochs"]["value"] >= 20


def test_the_ema_schedule_follows_the_profiles_run_length():
    from mimlab.experiments.evidence.runner import Runner

    def m0(p: dict) -> str:
        ov = Runner(p, "d", Path("r"), Path("s")).pretrain_overrides("contrastive", "cmae", 0)
        return next(o for o in ov if o.startswith("method.ema_momentum="))

    assert m0(PROTOCOL) == "method.ema_momentum=0.1987"  # 1 - 1 / (0.002 x 624)
    assert m0(PROFILES["gpu"]()) == "method.ema_momentum=0.9744"  # 19,500 steps
    assert ARMS["cmae"].ema and not ARMS["mae"].ema


def test_bad_arguments_are_one_line(tmp_path, capsys):
    flat = tmp_path / "flat"
    flat.mkdir()
    argv = ["reproduce", "--data", str(flat), "--out", str(tmp_path / "o")]
    assert cli.run([*argv, "--suite", "quick"]) == 2
    assert "train/ and test/" in capsys.readouterr().err
    assert cli.run([*argv, "--suite", "medium"]) == 2
    assert "unknown suite 'medium'" in capsys.readouterr().err
    assert cli.run([*argv, "--suite", "quick", "--stage", "nope"]) == 2
    assert "unknown stage 'nope'" in capsys.readouterr().err
    assert cli.run([*argv, "--suite", "standard"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "protocol v1" in err and "retired" in err
    assert "docs/results/standard/report.md" in err and "--suite evidence" in err
    assert not (tmp_path / "o").exists()
