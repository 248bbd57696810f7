"""``mimlab reproduce``: the quick suite runs end to end at micro scale, records failures without
stopping, resumes (finished sub-runs skipped), refuses a folder of other settings, and its
ordering checks say what the numbers say."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mimlab import cli
from mimlab.experiments.quick import (
    QUICK,
    Outcome,
    ReproduceError,
    Suite,
    ordering_checks,
    reproduce,
)
from tests.conftest import make_imagefolder

MICRO = dict(
    preset="micro",
    methods=("mae", "rmae"),
    pretrain_images=None,
    pretrain_epochs=1,
    batch=8,
    ft_images=None,
    ft_epochs=1,
    fewshot_epochs=1,
    eval_images=30,
    lp_epochs=2,
    psnr_images=8,
    cka_images=8,
    small_ns=(1,),
    small_steps=2,
    sampling_n=10,
    teacher_size=None,
    workers=0,
)


@pytest.fixture(scope="module")
def ten_classes(tmp_path_factory) -> Path:
    return make_imagefolder(tmp_path_factory.mktemp("ten"), classes=10, per_class=12)


def test_suite_records_failure_then_resumes(ten_classes, tmp_path, monkeypatch, capsys):
    out = tmp_path / "suite"
    real = Suite.pretrain

    def broken(self, name, method, extra):
        if method == "rmae":
            raise RuntimeError("simulated crash in R-MAE pretraining")
        return real(self, name, method, extra)

    monkeypatch.setattr(Suite, "pretrain", broken)
    report = reproduce("quick", str(ten_classes), str(out), overrides=MICRO)
    runs = json.loads((out / "summary.json").read_text())["subruns"]
    assert runs["pretrain/rmae"]["status"] == "failed"
    assert "simulated crash" in (out / "pretrain" / "rmae" / "FAILED.txt").read_text()
    for dep in ("ft/rmae", "fewshot/rmae", "linprobe/rmae", "knn/rmae", "psnr/rmae"):
        assert runs[dep]["status"] == "blocked", dep
    # everything else ran
    others = {k: v for k, v in runs.items() if "rmae" not in k}
    assert {v["status"] for v in others.values()} == {"done"}, others
    text = report.read_text()
    assert "| MAE |" in text and "failed" in text

    # second invocation: the failure is fixed; finished sub-runs are not redone
    monkeypatch.setattr(Suite, "pretrain", real)
    capsys.readouterr()
    report = reproduce("quick", str(ten_classes), str(out), overrides=MICRO)
    printed = capsys.readouterr().out
    runs = json.loads((out / "summary.json").read_text())["subruns"]
    assert runs["pretrain/rmae"]["status"] == "done"
    assert runs["ft/rmae"]["status"] == "done" and runs["psnr/rmae"]["status"] == "done"
    assert runs["pretrain/mae"]["status"] == "skipped"
    assert "pretrain/mae: already done" in printed
    assert not (out / "pretrain" / "rmae" / "FAILED.txt").exists()

    # the report carries our numbers, the paper's beside them, and the plots
    text = report.read_text()
    mae_row = next(ln for ln in text.splitlines() if ln.startswith("| MAE |"))
    cells = [c.strip() for c in mae_row.strip("|").split("|")]
    ft = float(cells[3])
    assert ft == pytest.approx(runs["ft/mae"]["result"]["top1"], abs=0.01)
    assert cells[8] == "83.1" and cells[9] == "22.2"  # Table 1: MAE FT, PSNR
    assert float(cells[7]) == pytest.approx(runs["psnr/mae"]["result"]["psnr"], abs=0.01)
    for f in (
        "accuracy.png",
        "small_data.png",
        "cka/cka.csv",
        "psnr/mae/grid.png",
        "psnr/rmae/grid.png",
    ):
        assert (out / f).is_file(), f
    assert "![accuracy per method](accuracy.png)" in text
    # CKA last-block table has one row per analysed model with values in [0, 1]
    cka_rows = [
        ln
        for ln in text.split("## Figure 1")[1].split("##")[0].splitlines()
        if ln.startswith("| ") and not ln.startswith("| model")
    ]
    labels = [r.split("|")[1].strip() for r in cka_rows]
    assert {"MAE", "R-MAE", "supervised", "random init"} <= set(labels)
    for r in cka_rows:
        for v in r.strip("|").split("|")[1:]:
            assert 0.0 <= float(v) <= 1.0 + 1e-6
    # small-data rows: the sampling strategies of Table 7 and the photo
    for tag in ("n1-random", "n10-one_class", "n10-one_per_class", "n10-random", "photo-astronaut"):
        r = runs[f"small/ft-{tag}"]
        assert r["status"] == "skipped", tag  # finished in the first invocation
        assert 0.0 <= r["result"]["top1"] <= 100.0

    # a different profile in the same folder is refused, naming the field
    with pytest.raises(ReproduceError, match="ft_epochs"):
        reproduce("quick", str(ten_classes), str(out), overrides={**MICRO, "ft_epochs": 2})


def test_small_data_subsets_follow_table7(ten_classes, tmp_path):
    """The one_class run really sees one class, one_per_class all ten (config of the run)."""
    from mimlab.core.config import DataConfig, from_dict
    from mimlab.data.datasets import build_dataset

    s = Suite(QUICK, str(ten_classes), tmp_path)
    runs = dict(s.small_data_runs())
    assert set(runs) >= {
        "n1-random",
        "n10-random",
        "n10-one_class",
        "n10-one_per_class",
        "photo-astronaut",
    }
    for tag, n_classes in (("n10-one_class", 1), ("n10-one_per_class", 10)):
        ov = dict(e.split("=", 1) for e in runs[tag])
        dc = from_dict(
            DataConfig,
            {"path": str(ten_classes), "limit": int(ov["data.limit"]), "subset": ov["data.subset"]},
        )
        ds = build_dataset(dc, "train", 32, 3, 0, train_aug=False, labelled=True)
        assert len(ds) == 10
        assert len({int(ds[i][1]) for i in range(len(ds))}) == n_classes


def test_bad_arguments_are_clear(ten_classes, tmp_path, capsys):
    with pytest.raises(ReproduceError, match="quick | full"):
        reproduce("medium", str(ten_classes), str(tmp_path / "a"))
    with pytest.raises(ReproduceError, match="unknown profile field"):
        reproduce("quick", str(ten_classes), str(tmp_path / "b"), overrides={"epochz": 1})
    flat = tmp_path / "flat"
    flat.mkdir()
    with pytest.raises(ReproduceError, match="train/ and test/"):
        reproduce("quick", str(flat), str(tmp_path / "c"))
    rc = cli.run(
        ["reproduce", "--suite", "quick", "--data", str(flat), "--out", str(tmp_path / "d")]
    )
    assert rc == 2
    assert "train/ and test/" in capsys.readouterr().err


def _suite_with(tmp_path, values: dict) -> Suite:
    s = Suite(QUICK, "data", tmp_path)
    for name, top1 in values.items():
        s.outcomes[name] = Outcome(name, "done", {"top1": top1})
    return s


def _row(rows, start):
    return next(r for r in rows if r.startswith(f"| {start}"))


def test_ordering_checks_follow_the_numbers(tmp_path):
    s = _suite_with(
        tmp_path,
        {
            "ft/random": 50.0,
            "ft/mae": 60.0,
            "ft/rmae": 59.5,
            "ft/cmae": 55.0,
            "linprobe/mae": 40.0,
            "linprobe/cmae": 45.0,
            "linprobe/mocov3": 30.0,
            "ft/mocov3": 58.0,
        },
    )
    rows = ordering_checks(s, noise=None)
    assert "| yes |" in _row(rows, "MAE > random init on FT")
    assert "| yes |" in _row(rows, "R-MAE ≈ MAE")  # 0.5 apart, tolerance 1
    assert "| **no** |" in _row(rows, "C-MAE ≈ MAE")  # 5 apart
    assert "| **no** |" in _row(rows, "MAE > C-MAE on linear probe")
    assert "| **no** |" in _row(rows, "MoCo v3 > MAE on linear probe")
    assert "| yes |" in _row(rows, "MAE > MoCo v3 on FT")
    assert "| n/a |" in _row(rows, "R-MAE† ≈ MAE")  # not run
    # a larger seed spread widens "approximately equal"
    rows = ordering_checks(s, noise=3.0)
    assert "| yes |" in _row(rows, "C-MAE ≈ MAE") and "±6.00" in _row(rows, "C-MAE ≈ MAE")
