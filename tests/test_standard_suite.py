"""The standard suite end to end at a toy scale: stages resume from the small result files, the
report is regenerated from them alone, and claim (a) gets a paired CI and a verdict."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import pytest

from mimlab.experiments.standard import (
    CLAIMS,
    STAGES,
    StandardError,
    StandardProfile,
    StandardSuite,
    _crossing,
    claim_a,
    reproduce_standard,
    write_report,
)

TOY = dict(
    preset="micro",
    pool_images=24,
    batch=8,
    pretrain_epochs=2,
    curve_epochs=2,
    curve_points=(1, 2),
    ft_epochs=1,
    ft_seeds=(0, 1),
    sweep_layer_decay=(0.75, 1.0),
    sweep_lr_factors=(2.0,),
    lp_epochs=2,
    cka_images=12,
    cka_ratios=(0.5,),
    psnr_images=6,
    workers=0,
)


RECIPE = {"layer_decay": 1.0, "base_lr": 2e-3, "lr_extend": 3}  # what hand-made results carry


def put_sweeps(res, *names):
    """Sweep files of the current protocol choosing ``RECIPE`` (``stage/arm``)."""
    for n in names:
        f = res / f"{n.split('/')[0]}/sweep/{n.split('/')[1]}.json"
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text(json.dumps({**RECIPE, "holdout_top1": 1.0, "grid": []}))


@pytest.mark.slow
def test_core_stage_end_to_end(tiny_folder, tmp_path):
    runs, res = tmp_path / "runs", tmp_path / "results"
    rep = reproduce_standard("core", str(tiny_folder), str(runs), str(res), **TOY)
    text = rep.read_text()
    assert "(a) MAE-init FT > random-init FT" in text
    s = StandardSuite(StandardProfile(**TOY), str(tiny_folder), runs, res)
    a = claim_a(s)
    # every pretraining seed x 2 FT seeds, paired with the random-init FT seeds
    assert a["ft"]["n_units"] == 2 * STAGES["core"].pretrain_seeds
    assert a["verdict"] in ("holds", "contradicted", "undecided")
    assert a["ft"]["lo"] <= a["ft"]["mean"] <= a["ft"]["hi"]
    sweep = json.loads((res / "core/sweep/random.json").read_text())
    assert len(sweep["grid"]) == 3 and sweep["layer_decay"] in (0.75, 1.0)
    for e in (1, 2):
        assert (res / f"core/curve/knn-e{e}.json").is_file()
    assert (res / "core/curve.png").is_file()
    assert (res / "core/cka.json").is_file()
    # the R-MAE stage's PSNR step also scores MAE's core runs, per image, on the same images
    s.psnr("rmae")
    ps = [json.loads((res / f"rmae/psnr/mae-s{i}.json").read_text()) for i in (0, 1)]
    assert [len(p["per_image"]["psnr_visible_stats"]) for p in ps] == [6, 6]
    assert ps[0]["per_image"] != ps[1]["per_image"]
    summary = json.loads((res / "summary.json").read_text())
    # finished sub-runs are skipped: a second run of the stage trains nothing new, even on a
    # "fresh machine" whose run directories (checkpoints) are gone
    shutil.rmtree(runs)
    before = {p: p.stat().st_mtime for p in res.rglob("*.json") if p.name != "summary.json"}
    reproduce_standard("core", str(tiny_folder), str(runs), str(res), **TOY)
    after = {p: p.stat().st_mtime for p in res.rglob("*.json") if p.name != "summary.json"}
    assert [p for p in before if after[p] != before[p]] == [] and not runs.exists()
    # the report is regenerated from the result files alone (no checkpoints, no runs/)
    (res / "report.md").unlink()
    rep2 = reproduce_standard(None, str(tiny_folder), str(runs), str(res), report_only=True, **TOY)
    assert json.loads((res / "summary.json").read_text())["claim_a"] == summary["claim_a"]
    assert "Claim (a) in detail" in rep2.read_text()


def test_lost_checkpoint_is_rebuilt_only_when_needed(tiny_folder, tmp_path):
    """A sub-run that still has to run gets its pretraining checkpoint back (deterministic
    retraining); finished ones never trigger it."""
    runs, res = tmp_path / "runs", tmp_path / "results"
    s = StandardSuite(StandardProfile(**TOY), str(tiny_folder), runs, res)
    r = s.pretrain("core", "mae", 0, 1, "mae-s0")
    ck = Path(r["checkpoint"])
    first = ck.read_bytes()
    shutil.rmtree(runs)
    s2 = StandardSuite(StandardProfile(**TOY), str(tiny_folder), runs, res)
    s2.pretrain("core", "mae", 0, 1, "mae-s0")  # result file exists: nothing runs
    assert not ck.exists()
    got = s2.ckpt("core/pretrain/mae-s0")()  # a pending sub-run asks for it
    assert Path(got) == ck and ck.is_file()
    import torch

    a = torch.load(io.BytesIO(first), weights_only=False)["model"]
    b = torch.load(ck, weights_only=False)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_bad_stage_and_field(tmp_path):
    with pytest.raises(StandardError, match="unknown stage"):
        reproduce_standard("nope", "x", str(tmp_path), str(tmp_path))
    with pytest.raises(StandardError, match="unknown profile field"):
        reproduce_standard("core", "x", str(tmp_path), str(tmp_path), nonsense=1)
    assert set(STAGES) == {"core", "rmae", "contrastive", "cmae_variants", "smalldata", "augment"}


def test_crossing():
    pts = [(10, 20.0), (100, 30.0), (1000, 40.0)]
    c = _crossing(pts, 35.0)
    assert 100 < c["crossover_images"] < 1000 and c["above_from_images"] == 1000
    assert _crossing(pts, 10.0)["above_at_first_point"]
    assert "crossover_images" not in _crossing(pts, 50.0)


def test_empty_report(tmp_path):
    s = StandardSuite(StandardProfile(), "x", tmp_path / "r", tmp_path / "res")
    text = write_report(s).read_text()
    assert text.count("not run yet") == len(CLAIMS)


@pytest.mark.parametrize(
    "arm", sorted(__import__("mimlab.experiments.standard", fromlist=["ARMS"]).ARMS)
)
def test_every_arm_resolves(arm, tmp_path):
    """Each declared arm is a valid pretraining config (typos in overrides fail here, not two
    hours into a stage)."""
    from mimlab.core.config import PretrainConfig, resolve
    from mimlab.experiments.standard import ARMS

    a, p = ARMS[arm], StandardProfile()
    s = StandardSuite(p, str(tmp_path), tmp_path / "runs", tmp_path / "results")
    ov = s.pretrain_overrides("x", arm, 0, p.pretrain_epochs, f"{arm}-s0")
    cfg = resolve(PretrainConfig, overrides=ov)
    assert cfg.method.name == a.method and cfg.model.preset == p.preset
    steps = p.pretrain_epochs * (p.pool_images // p.batch)
    if a.small:  # N images repeated to the same steps, and the same warm-up in steps
        assert cfg.data.limit == a.small and cfg.data.repeat * a.small >= steps * p.batch
        assert cfg.optim.epochs == 1
        per_epoch = cfg.data.repeat * a.small // p.batch
        assert cfg.optim.warmup_epochs * per_epoch == pytest.approx(
            p.warmup_epochs * (p.pool_images // p.batch), rel=0.01
        )
    else:
        assert cfg.data.limit == p.pool_images and cfg.optim.epochs == p.pretrain_epochs
        assert cfg.optim.warmup_epochs == p.warmup_epochs
    if a.hp_from:
        assert a.hp_from in ARMS


def test_cmae_variants_table_pairs_each_reading_with_the_default(tmp_path):
    """The negatives x queries table: every reading against cmae (position / all), paired on
    the FT seeds they share and on the test images; hand-made result files, no training."""
    from mimlab.core.stats import pack_correct
    from mimlab.experiments.standard import _variant_rows

    res = tmp_path / "results"
    N = 200

    def put(name, correct):
        f = res / f"{name}.json"
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text(
            json.dumps(
                {"top1": 100.0 * sum(correct) / N, "correct": pack_correct(correct), **RECIPE}
            )
        )

    base = [i % 2 == 0 for i in range(N)]  # 50 %
    better = [i % 2 == 0 or i % 5 == 1 for i in range(N)]  # + the odd i % 5 == 1: 60 %
    for f in (0, 1, 2):
        put(f"contrastive/ft/cmae-s0-ft{f}", base)
    put("contrastive/linprobe/cmae-s0-cls", base)
    for f in (0, 1):
        put(f"cmae_variants/ft/cmae_position_removed-s0-ft{f}", better)
    put("cmae_variants/linprobe/cmae_position_removed-s0-cls", base)
    put_sweeps(res, "contrastive/cmae")
    s = StandardSuite(StandardProfile(**TOY), str(tmp_path), tmp_path / "runs", res)
    out = _variant_rows(s)
    assert len(out["rows"]) == 2 and out["rows"][0].startswith("| position | all | 50.00 | – |")
    ft = out["summary"]["cmae_position_removed"]["ft"]["diff"]
    assert ft["n_units"] == 2 and ft["mean"] == pytest.approx(10.0)  # FT seeds 0 and 1 only
    assert ft["lo"] > 0  # identical units: image SE
    lp = out["summary"]["cmae_position_removed"]["lp_cls"]["diff"]
    assert lp["mean"] == 0.0 and lp["n_units"] == 1
    assert "| position | removed | 60.00 | +10.00 [" in out["rows"][1]
    # a probe whose lr was chosen without the extension is not used
    from mimlab.experiments.standard import unit_results

    f = res / "contrastive/linprobe/cmae-s0-cls.json"
    f.write_text(
        json.dumps({k: v for k, v in json.loads(f.read_text()).items() if k != "lr_extend"})
    )
    assert unit_results(s, "cmae", "lp_cls") == {} and len(unit_results(s, "cmae", "ft")) == 3


def test_single_pretraining_run_widens_the_interval_by_maes_seed_spread(tmp_path):
    """An arm with one pretraining run is compared with MAE's pretraining-seed sd added: its FT
    seeds alone cannot show how another pretraining run would differ."""
    from mimlab.core.stats import pack_correct
    from mimlab.experiments.standard import compare, pretrain_seed_sd

    res, N = tmp_path / "results", 400

    def put(name, k):  # k of every 10 images correct
        c = [i % 10 < k for i in range(N)]
        f = res / f"{name}.json"
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text(json.dumps({"top1": 100.0 * sum(c) / N, "correct": pack_correct(c), **RECIPE}))

    put_sweeps(res, "core/mae", "core/random", "rmae/rmae")
    for f in (0, 1):
        put(f"core/ft/mae-s0-ft{f}", 4)  # 40 %
        put(f"core/ft/mae-s1-ft{f}", 6)  # 60 %: the pretraining seeds differ by 20 points
        put(f"core/ft/random-ft{f}", 3)
        put(f"rmae/ft/rmae-s0-ft{f}", 5)
    s = StandardSuite(StandardProfile(**TOY), str(tmp_path), tmp_path / "runs", res)
    sd = pretrain_seed_sd(s, "ft")
    assert sd == pytest.approx(14.142, abs=1e-3)  # sd of (40, 60)
    a = compare(s, "mae", "random", "ft", ">")  # two pretraining runs: as is
    assert "pretrain_seed_sd" not in a and a["diff"]["n_units"] == 4
    b = compare(s, "rmae", "mae", "ft", "~")  # one run each: widened
    d = b["diff"]
    assert b["pretrain_seed_sd"] == pytest.approx(sd)
    assert d["mean"] == pytest.approx(10.0)  # 50 vs MAE seed 0's 40
    assert d["hi"] - d["mean"] >= 1.96 * sd * 2**0.5 - 1e-9
    assert b["verdict"] == "undecided"
    # results of an older protocol are not used: a recipe the sweep no longer chooses, a
    # sweep without the lr extension
    f = res / "rmae/ft/rmae-s0-ft1.json"
    f.write_text(json.dumps({**json.loads(f.read_text()), "base_lr": 1e-3}))
    assert compare(s, "rmae", "mae", "ft", "~")["diff"]["n_units"] == 1
    sw = res / "rmae/sweep/rmae.json"
    sw.write_text(json.dumps({**json.loads(sw.read_text()), "lr_extend": None}))
    assert compare(s, "rmae", "mae", "ft", "~") is None


def test_psnr_comparison_pairs_images_and_widens_by_maes_runs(tmp_path):
    """Claim (b)'s PSNR part: per-image dB paired on the same images (a non-finite image is
    dropped from both arms), widened by the spread of MAE's two core runs' PSNR."""
    from mimlab.experiments.standard import PSNR_METRICS, compare, judge

    res, N = tmp_path / "results", 200

    def put(name, base, inf_at=None):
        v = [base + (i % 5) * 0.5 for i in range(N)]
        if inf_at is not None:
            v[inf_at] = None
        per = {k: v for k, _ in PSNR_METRICS.values()}
        f = res / f"rmae/psnr/{name}.json"
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text(json.dumps({"per_image": per}))

    put("mae-s0", 20.0)
    put("mae-s1", 20.4)  # MAE's runs differ by 0.4 dB: sd 0.283
    put("rmae-s0", 21.5, inf_at=3)
    s = StandardSuite(StandardProfile(**TOY), str(tmp_path), tmp_path / "runs", res)
    c = compare(s, "rmae", "mae", "psnr_visible", ">")
    d = c["diff"]
    assert d["n_units"] == 1 and d["n_images"] == N - 1  # paired with MAE seed 0, one dropped
    assert d["mean"] == pytest.approx(1.5) and d["image_se"] == pytest.approx(0.0)
    assert c["pretrain_seed_sd"] == pytest.approx(0.4 / 2**0.5)
    assert d["lo"] == pytest.approx(1.5 - 1.96 * 0.4 / 2**0.5 * 2**0.5)
    assert c["verdict"] == "holds"
    put("rmae-s0", 20.2)  # within MAE's own run-to-run spread: undecided
    assert compare(s, "rmae", "mae", "psnr_true", ">")["verdict"] == "undecided"
    # claim (b) waits for its FT comparisons; the PSNR ones are already there
    j = judge(s, "b")
    assert j["verdict"] is None and {r["metric"] for r in j["comparisons"]} == set(PSNR_METRICS)
    assert "## Reconstruction PSNR" in write_report(s).read_text()


def test_claim_e_orders_the_contrastive_stage_cka(tmp_path):
    from mimlab.experiments.standard import claim_e

    res = tmp_path / "results"
    s = StandardSuite(StandardProfile(**TOY), str(tmp_path), tmp_path / "runs", res)
    assert claim_e(s) is None
    (res / "contrastive").mkdir(parents=True)

    def put(mae, moco, sup):
        lb = {"MAE": {"0.75": mae}, "MoCo v3": {"0.75": moco}, "supervised": {"0.75": sup}}
        (res / "contrastive/cka.json").write_text(json.dumps({"images": 512, "last_block": lb}))
        return claim_e(s)["verdict"]

    assert put(0.98, 0.90, 0.80) == "holds"
    assert put(0.98, 0.99, 0.80) == "contradicted"
    assert put(0.98, 0.90, 0.90) == "undecided"
    assert "(e) last-block CKA" in write_report(s).read_text()


@pytest.mark.parametrize(
    "peak, want, tried",
    [
        (4e-3, 4e-3, {5e-4, 1e-3, 2e-3, 4e-3, 8e-3}),  # beyond the grid: extended, then inside
        (1.0, 1.6e-2, {5e-4, 1e-3, 2e-3, 4e-3, 8e-3, 1.6e-2}),  # far beyond: at most 3 more
        (1e-4, 1.25e-4, {6.25e-5, 1.25e-4, 2.5e-4, 5e-4, 1e-3, 2e-3}),  # below: halved
        (1e-3, 1e-3, {5e-4, 1e-3, 2e-3}),  # inside the grid: nothing more
    ],
)
def test_sweep_extends_the_lr_until_the_best_is_inside_the_grid(tmp_path, peak, want, tried):
    import math

    prof = StandardProfile(
        **{**TOY, "sweep_layer_decay": (0.75, 1.0), "sweep_lr_factors": (0.5, 2.0)}
    )
    s = StandardSuite(prof, str(tmp_path), tmp_path / "runs", tmp_path / "res")
    seen = []

    def fake_ft(name, sub, ckpt, seed, ld, lr, holdout):
        assert holdout and seed == 0
        seen.append((ld, lr))
        return {"top1": 50 - abs(math.log(lr / peak)) + (ld == 1.0)}

    s.finetune = fake_ft
    hp = s.sweep("core", "mae", None)
    assert hp["layer_decay"] == 1.0 and hp["base_lr"] == pytest.approx(want)
    assert {round(lr, 9) for ld, lr in seen if ld == 1.0} == {round(x, 9) for x in tried}
    assert len(seen) == len(set(seen)) and hp["lr_extend"] == prof.sweep_lr_extend


def test_a_result_fine_tuned_with_another_recipe_is_rerun(tmp_path, monkeypatch):
    """After a sweep changes its choice, FT results made with the old recipe are redone (the
    old file would otherwise be skipped as done); results with the current recipe are kept."""
    import mimlab.experiments.standard as st

    calls = []
    monkeypatch.setattr(st.tasks, "resolve_run_config", lambda cls, overrides: overrides)

    def fake_finetune(ov):
        calls.append(ov)
        lr = float(next(o for o in ov if o.startswith("optim.base_lr=")).split("=")[1])
        return {"top1": 40.0, "layer_decay": 1.0, "base_lr": lr}

    monkeypatch.setattr(st.tasks, "finetune", fake_finetune)
    s = StandardSuite(StandardProfile(**TOY), str(tmp_path), tmp_path / "runs", tmp_path / "res")
    s.finetune("core/ft/random-ft0", "core/ft", None, 0, 1.0, 2e-3, False)
    s.finetune("core/ft/random-ft0", "core/ft", None, 0, 1.0, 2e-3, False)
    assert len(calls) == 1  # done: skipped
    r = s.finetune("core/ft/random-ft0", "core/ft", None, 0, 1.0, 4e-3, False)
    assert len(calls) == 2 and r["base_lr"] == 4e-3
    assert s.done("core/ft/random-ft0")["base_lr"] == 4e-3


def test_a_sweep_of_an_older_protocol_is_replayed_and_its_followers_wait(tmp_path):
    """A sweep file without the current lr extension is redone (its points come from their
    cached files); an arm reusing another's recipe refuses a recipe of the older protocol."""
    res = tmp_path / "res"
    s = StandardSuite(StandardProfile(**TOY), str(tmp_path), tmp_path / "runs", res)
    (res / "core/sweep").mkdir(parents=True)
    old = {"layer_decay": 1.0, "base_lr": 2e-3, "holdout_top1": 30.0, "grid": []}
    (res / "core/sweep/mae.json").write_text(json.dumps(old))
    with pytest.raises(StandardError, match="run the stage 'core' first"):
        s.evaluate("core", "mae32-s0", lambda: "ckpt")
    seen = []

    def fake_ft(name, sub, ckpt, seed, ld, lr, holdout):
        seen.append(name)
        return {"top1": 30.0 + 1000 * lr + (ld == 1.0)}  # the larger the lr, the better

    s.finetune, s.probe = fake_ft, lambda *a, **k: None
    out = s.evaluate("core", "mae-s0", lambda: "ckpt")
    assert out["hp"]["lr_extend"] == 3 and out["hp"]["base_lr"] == pytest.approx(1.6e-2)
    assert s.done("core/sweep/mae")["base_lr"] == pytest.approx(1.6e-2)
    assert "core/sweep/mae/ld1.0-lr0.016" in seen and "core/ft/mae-s0-ft1" in seen


def test_a_probe_chosen_without_the_lr_extension_is_rerun(tmp_path, monkeypatch):
    import mimlab.experiments.standard as st

    calls = []
    monkeypatch.setattr(st.tasks, "resolve_run_config", lambda cls, overrides: overrides)

    def fake_linprobe(ov):
        calls.append(ov)
        return {"top1": 40.0, "lr_extend": int(ov[-2].split("=")[1])}

    monkeypatch.setattr(st.tasks, "linprobe", fake_linprobe)
    monkeypatch.setattr(st.tasks, "knn", lambda ov: calls.append(ov) or {"top1": 30.0})
    s = StandardSuite(StandardProfile(**TOY), str(tmp_path), tmp_path / "runs", tmp_path / "res")
    (tmp_path / "res/core/linprobe").mkdir(parents=True)
    (tmp_path / "res/core/linprobe/random-avg.json").write_text(json.dumps({"top1": 39.0}))
    r = s.probe("core/linprobe/random-avg", "core/linprobe", "linprobe", None, "avg")
    assert len(calls) == 1 and "probe.lr_extend=3" in calls[0] and r["lr_extend"] == 3
    s.probe("core/linprobe/random-avg", "core/linprobe", "linprobe", None, "avg")
    assert len(calls) == 1  # now current: skipped
    (tmp_path / "res/core/knn").mkdir(parents=True)
    (tmp_path / "res/core/knn/random.json").write_text(json.dumps({"top1": 29.0}))
    assert s.probe("core/knn/random", "core/knn", "knn", None, "avg")["top1"] == 29.0  # k-NN: kept


def test_an_arm_with_more_ft_seeds_pairs_only_on_the_seeds_both_have(tmp_path):
    from mimlab.core.stats import pack_correct
    from mimlab.experiments.standard import ARMS, arm_ft_seeds, compare, unit_results

    prof = StandardProfile(**TOY)
    assert arm_ft_seeds("mae", prof) == tuple(range(ARMS["mae"].ft_seeds))
    assert arm_ft_seeds("random", prof) == prof.ft_seeds == (0, 1)
    res, N = tmp_path / "results", 100
    c = pack_correct([i % 2 == 0 for i in range(N)])
    put_sweeps(res, "core/mae", "core/random")
    for name in [f"core/ft/mae-s0-ft{f}" for f in range(6)] + ["core/ft/random-ft0"]:
        f = res / f"{name}.json"
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text(json.dumps({"top1": 50.0, "correct": c, **RECIPE}))
    s = StandardSuite(prof, str(tmp_path), tmp_path / "runs", res)
    assert len(unit_results(s, "mae", "ft")) == 6
    assert compare(s, "mae", "random", "ft", ">")["diff"]["n_units"] == 1  # FT seed 0 only


def test_small_data_section_compares_every_size_with_random_init(tmp_path):
    """Claim (d): each N-image MAE arm and MAE on the whole pool against random init, as a
    table and a plot; a size without results is left out."""
    from mimlab.core.stats import pack_correct
    from mimlab.experiments.standard import SMALL_ARMS, _smalldata

    res, N = tmp_path / "results", 200

    def put(name, k, **extra):  # k of every 10 images correct
        c = [i % 10 < k for i in range(N)]
        f = res / f"{name}.json"
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text(json.dumps({"top1": 100.0 * sum(c) / N, "correct": pack_correct(c), **extra}))

    assert SMALL_ARMS == ("mae_n1", "mae_n10", "mae_n100", "mae_n1000")
    put_sweeps(res, "core/mae", "core/random", "smalldata/mae_n1", "smalldata/mae_n1000")
    for f in (0, 1):
        put(f"core/ft/random-ft{f}", 3, **RECIPE)
        put(f"core/ft/mae-s0-ft{f}", 6, **RECIPE)
        put(f"core/ft/mae-s1-ft{f}", 6, **RECIPE)
        put(f"smalldata/ft/mae_n1-s0-ft{f}", 4, **RECIPE)
        put(f"smalldata/ft/mae_n1000-s0-ft{f}", 5, **RECIPE)
    put("core/knn/random", 2)
    put("smalldata/knn/mae_n1-s0", 1)
    s = StandardSuite(StandardProfile(**TOY), str(tmp_path), tmp_path / "runs", res)
    out = _smalldata(s, tmp_path / "small.png")
    assert (tmp_path / "small.png").stat().st_size > 0
    assert [r["images"] for r in out["rows"]] == [1, 1000, 24]  # 10 and 100: no results
    assert out["rows"][-1]["whole_pool"] and not out["rows"][0]["whole_pool"]
    n1 = out["rows"][0]["results"]
    assert n1["ft"]["top1"] == pytest.approx(40.0)
    assert n1["ft"]["diff"]["mean"] == pytest.approx(10.0)  # 40 vs random's 30
    assert n1["knn"]["diff"]["mean"] == pytest.approx(-10.0)
    assert out["random"]["ft"] == pytest.approx(30.0) and out["random"]["lp_cls"] is None
    text = write_report(s).read_text()
    assert "## Pretraining on few images" in text
    assert "| 1,000 | 50.00 |" in text and "| 24 (whole pool) | 60.00 |" in text
    assert "| random init | 30.00 | – | – | – | – | – | 20.00 | – |" in text
    # claim (d) is judged on the sizes that ran and waits for the rest
    d = json.loads((res / "summary.json").read_text())["claims"]["d"]
    assert d["verdict"] is None and len(d["comparisons"]) == 3


def test_wall_time_counts_a_sweep_once(tmp_path):
    """A sweep's summary carries the wall time of its points, which have their own files: the
    report's per-stage sum counts them once."""
    res = tmp_path / "results"
    for name, w in (
        ("augment/sweep/x/ld1.0-lr0.001", 60.0),
        ("augment/sweep/x/ld1.0-lr0.002", 60.0),
        ("augment/sweep/x", 120.0),
        ("augment/ft/x-s0-ft0", 30.0),
    ):
        f = res / f"{name}.json"
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text(json.dumps({"wall_seconds": w}))
    s = StandardSuite(StandardProfile(**TOY), str(tmp_path), tmp_path / "runs", res)
    write_report(s)
    assert json.loads((res / "summary.json").read_text())["wall_minutes"] == {"augment": 2.5}
