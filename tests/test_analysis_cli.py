"""Analysis commands: ``mimlab analyze cka`` (block-wise CKA full vs masked images),
``mimlab visualize`` and ``mimlab analyze psnr`` on micro checkpoints of 2-step pretrainings."""

import csv
import json

import pytest
import torch
from conftest import make_imagefolder

from mimlab import tasks
from mimlab.analysis.cka import (
    AnalysedModel,
    load_encoder,
    model_cka,
    noise_digest,
    random_encoder,
    random_model_config,
)
from mimlab.analysis.common import analysis_dataset, mask_noise
from mimlab.cli import run
from mimlab.core.config import FinetuneConfig, PretrainConfig, resolve

COMMON = [
    "run.progress=false",
    "data.num_workers=0",
    "optim.batch_size=8",
    "run.max_steps=2",
    "optim.epochs=1",
    "model.preset=micro",
    "run.log_every=1",
]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """Same images as the ``tiny_folder`` fixture (3 classes x 8, train/ and test/)."""
    return make_imagefolder(tmp_path_factory.mktemp("cka") / "data")


@pytest.fixture(scope="module")
def ckpts(data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    paths = {}
    for name in ("mae", "rmae", "cmae"):
        cfg = resolve(
            PretrainConfig,
            overrides=[
                f"data.path={data_dir}",
                f"run.out_dir={out}",
                f"run.name={name}",
                f"method.name={name}",
                *COMMON,
            ],
        )
        paths[name] = tasks.pretrain(cfg)["checkpoint"]
    cfg = tasks.resolve_run_config(
        FinetuneConfig,
        overrides=[
            f"data.path={data_dir}",
            f"run.out_dir={out}",
            "run.name=ft",
            f"finetune.pretrained={paths['mae']}",
            "finetune.mixup=0",
            "finetune.cutmix=0",
            *[o for o in COMMON if not o.startswith("model.")],
        ],
    )
    tasks.finetune(cfg)
    paths["ft"] = str(out / "ft/checkpoints/last.pt")
    return paths


def _loader(data_dir, n=16, batch=8):
    ds = analysis_dataset(str(data_dir), "val", 32, 3, n, 0, [0.5] * 3, [0.5] * 3)
    return torch.utils.data.DataLoader(ds, batch_size=batch, shuffle=False)


def _self_cka(enc, data_dir, ratios):
    m = AnalysedModel("m", enc, "x", "random", [0.5] * 3, [0.5] * 3)
    stats = ([0.5] * 3, [0.5] * 3)
    vals, _ = model_cka(m, _loader(data_dir), stats, ratios, progress=False)
    return vals


def test_cka_of_model_with_itself_is_one_without_masking(data_dir, ckpts):
    """Ratio 0 keeps every token (in shuffled order): the masked pass is the full pass, CKA = 1
    at every block; one hidden patch of 64 (ratio 0.02) barely changes it."""
    mc = random_model_config("micro", ["model.patch_size=4"])
    for enc in (random_encoder(mc, 0), load_encoder(ckpts["mae"])[0]):
        vals = _self_cka(enc, data_dir, [0.0, 0.02])
        assert len(vals) == 2 * enc.depth
        for b in range(1, enc.depth + 1):
            assert vals[(0.0, b)] == pytest.approx(1.0, abs=1e-6)
            assert vals[(0.02, b)] > 0.9


def test_cli_cka_writes_every_row_with_shared_masks(data_dir, ckpts, tmp_path, capsys):
    out = tmp_path / "cka"
    ratios = ["0.25", "0.5", "0.75"]
    rc = run(
        [
            "analyze",
            "cka",
            "--data",
            str(data_dir),
            "--checkpoints",
            ckpts["mae"],
            ckpts["rmae"],
            ckpts["ft"],
            "--random-init",
            "--ratios",
            *ratios,
            "--images",
            "20",
            "--batch",
            "8",
            "--workers",
            "0",
            "--no-progress",
            "--out",
            str(out),
        ]
    )
    assert rc == 0
    printed = capsys.readouterr().out
    assert "last-block linear CKA" in printed
    rows = list(csv.DictReader(open(out / "cka.csv")))
    labels = ["mae", "rmae", "ft", "random-micro"]
    assert {(r["model"], r["ratio"], int(r["block"])) for r in rows} == {
        (m, r, b) for m in labels for r in ratios for b in (1, 2)
    }
    assert len(rows) == 4 * 3 * 2
    assert all(0.0 <= float(r["cka"]) <= 1.0 + 1e-9 for r in rows)
    for m in labels:
        assert (out / f"cka_{m}.png").stat().st_size > 1000
    assert (out / "cka_last_block.png").stat().st_size > 1000
    meta = json.loads((out / "cka.json").read_text())
    assert [m["kind"] for m in meta["models"]] == ["mae", "rmae", "finetune", "random"]
    # paired comparison: every model saw the same noise tensor for every batch (20 = 8+8+4)
    expected = [noise_digest(mask_noise(i, b, 16, seed=0)) for i, b in enumerate((8, 8, 4))]
    assert all(meta["noise_digests"][m] == expected for m in labels)
    assert mask_noise(1, 8, 16, 0).equal(mask_noise(1, 8, 16, 0))
    assert not mask_noise(1, 8, 16, 0).equal(mask_noise(2, 8, 16, 0))


def test_cli_cka_mask_token_mode(data_dir, ckpts, tmp_path):
    out = tmp_path / "mt"
    args = [
        "analyze",
        "cka",
        "--data",
        str(data_dir),
        "--ratios",
        "0.5",
        "--images",
        "8",
        "--batch",
        "8",
        "--workers",
        "0",
        "--no-progress",
        "--out",
        str(out),
        "--mode",
        "mask_token",
    ]
    assert run(args + ["--checkpoints", ckpts["cmae"], "--random-init", "micro"]) == 0
    assert len(list(csv.DictReader(open(out / "cka.csv")))) == 2 * 2
    assert run(args + ["--checkpoints", ckpts["mae"]]) == 1  # MAE encoder: no mask token


def test_visualize_and_psnr(ckpts, data_dir, tmp_path, capsys):
    for name in ("mae", "rmae"):
        png = tmp_path / f"{name}.png"
        assert (
            run(
                [
                    "visualize",
                    "--checkpoint",
                    ckpts[name],
                    "--data",
                    str(data_dir),
                    "--n",
                    "4",
                    "--ratio",
                    "0.75",
                    "--out",
                    str(png),
                ]
            )
            == 0
        )
        assert png.stat().st_size > 1000
        assert "PSNR" in capsys.readouterr().out
    js = tmp_path / "psnr.json"
    assert (
        run(
            [
                "analyze",
                "psnr",
                "--checkpoint",
                ckpts["mae"],
                "--data",
                str(data_dir),
                "--images",
                "12",
                "--batch",
                "8",
                "--workers",
                "0",
                "--no-progress",
                "--out",
                str(js),
            ]
        )
        == 0
    )
    res = json.loads(js.read_text())
    assert json.loads(capsys.readouterr().out)["psnr"] == res["psnr"]
    assert res["images"] == 12 and res["mask_ratio"] == 0.75
    assert torch.isfinite(torch.tensor([res["psnr"], res["psnr_all_predicted"]])).all()
    # pasting the visible patches back can only help
    assert res["psnr"] >= res["psnr_all_predicted"]
    # both de-normalisations of norm_pix patches; `psnr` keeps its meaning (true stats)
    assert res["norm_pix"] and "leak" in res["psnr_note"]
    assert res["psnr"] == res["psnr_true_stats"]
    assert res["psnr_all_predicted"] == res["psnr_all_predicted_true_stats"]
    assert res["psnr_visible_stats"] != res["psnr_true_stats"]
    assert res["psnr_visible_stats"] >= res["psnr_all_predicted_visible_stats"]
    assert "per_image" not in res


def test_psnr_per_image_pairs_across_checkpoints(ckpts, data_dir, tmp_path):
    """``per_image=True`` keeps each image's PSNR, in the same order (same seeded images and
    masks) for every checkpoint, and their mean is the reported mean."""
    from mimlab.analysis.recon import analyze_psnr

    kw = dict(data=str(data_dir), images=12, batch=5, workers=0, progress=False, per_image=True)
    a = analyze_psnr(ckpts["mae"], out=str(tmp_path / "a.json"), **kw)
    b = analyze_psnr(ckpts["rmae"], out=str(tmp_path / "b.json"), **kw)
    for k in ("psnr_true_stats", "psnr_visible_stats"):
        v = a["per_image"][k]
        assert len(v) == 12 == len(b["per_image"][k])
        assert sum(v) / len(v) == pytest.approx(a[k], abs=1e-3)
        assert v != b["per_image"][k]  # two models, not one list twice
    assert json.loads((tmp_path / "a.json").read_text())["per_image"] == a["per_image"]


def test_visualize_stats_option(ckpts, data_dir, tmp_path, capsys):
    from mimlab.analysis.recon import visualize_checkpoint

    res = {
        s: visualize_checkpoint(
            ckpts["mae"], str(data_dir), n=3, ratio=0.75, out=str(tmp_path / f"{s}.png"), stats=s
        )
        for s in ("visible", "true")
    }
    assert res["visible"]["psnr_shown"] == res["visible"]["psnr_visible_stats"]
    assert res["true"]["psnr_shown"] == res["true"]["psnr_true_stats"]
    assert (
        run(
            [
                "visualize",
                "--checkpoint",
                ckpts["mae"],
                "--data",
                str(data_dir),
                "--n",
                "2",
                "--stats",
                "true",
                "--out",
                str(tmp_path / "cli.png"),
            ]
        )
        == 0
    )
    assert "figure: true stats" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        run(["visualize", "--checkpoint", ckpts["mae"], "--stats", "leaky"])


@pytest.mark.parametrize("kind", ["cmae", "ft"])
def test_psnr_on_non_reconstructive_checkpoint_fails_in_one_line(ckpts, data_dir, kind, capsys):
    rc = run(
        [
            "analyze",
            "psnr",
            "--checkpoint",
            ckpts[kind],
            "--data",
            str(data_dir),
            "--images",
            "4",
            "--workers",
            "0",
            "--no-progress",
        ]
    )
    err = capsys.readouterr().err.strip()
    assert rc == 1
    assert len(err.splitlines()) == 1 and "no pixel decoder" in err, err
