"""The benchmark scripts (benchmarks/bench_{train,data,memory}.py) and ``mimlab bench`` run end to
end on the micro preset with minimal sizes, one torch thread. Smoke test: every script exits 0,
its ``--json`` lines parse and the rates and ratios are positive finite numbers. Nothing is
asserted about speed."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mimlab import cli

REPO = Path(__file__).resolve().parents[1]
suite = cli.load_bench_suite(REPO / "benchmarks" / "suite.py")  # a repository tool, not mimlab
Step = suite.Step

pytestmark = pytest.mark.slow


def micro_steps(cifar_dir) -> list[Step]:
    return [
        Step(
            "train micro",
            "train",
            "bench_train.py",
            [
                "--preset",
                "micro",
                "--batch",
                "4",
                "--what",
                "both",
                "--reps",
                "1",
                "--peak-size",
                "128",
                "--checkpointing",
                "selective,full",
            ],
        ),
        Step(
            "data micro",
            "data",
            "bench_data.py",
            [
                "--cifar",
                str(cifar_dir),
                "--workers",
                "2",
                "--preset-cifar",
                "micro",
                "--batch-cifar",
                "8",
                "--preset-folder",
                "micro",
                "--batch-folder",
                "4",
                "--folder-images",
                "16",
                "--folder-side",
                "48",
                "--batches",
                "4",
                "--reps",
                "1",
                "--fed-steps",
                "1",
            ],
        ),
        Step(
            "memory micro",
            "memory",
            "bench_memory.py",
            [
                "--configs",
                "micro@4,micro@8,micro@8+selective,micro@8+ckpt",
                "--steps",
                "1",
                "--fits",
                "micro@8",
            ],
        ),
    ]


@pytest.fixture(scope="module")
def bench_results(cifar_dir, tmp_path_factory):
    return suite.run_steps(
        micro_steps(cifar_dir),
        tmp_path_factory.mktemp("bench"),
        echo=False,
        timeout=300,
        env={"OMP_NUM_THREADS": "1"},
    )


def positive(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x > 0


def test_scripts_exit_zero_and_write_json(bench_results):
    print({s["name"]: round(s["seconds"], 1) for s in bench_results})
    for s in bench_results:
        assert s["rc"] == 0, f"{s['command']}\n{s['output'][-3000:]}"
        assert s["records"], f"{s['name']} wrote no JSON"
        assert all(r["bench"] == s["kind"] for r in s["records"])


def test_train_records(bench_results):
    (s,) = [s for s in bench_results if s["kind"] == "train"]
    assert sorted(r["what"] for r in s["records"]) == ["finetune", "mae"]
    for r in s["records"]:
        assert r["preset"] == "micro" and r["batch"] == 4
        for k in (
            "mimlab_img_s",
            "reference_img_s",
            "ratio",
            "gflops_per_image",
            "mimlab_gflop_s",
            "matmul_peak_gflop_s",
            "fraction_of_peak",
        ):
            assert positive(r[k]), (k, r[k])
    (mae,) = [r for r in s["records"] if r["what"] == "mae"]
    assert sorted(mae["checkpointing_img_s"]) == ["full", "selective"]
    assert all(positive(v) for v in mae["checkpointing_img_s"].values())
    assert "checkpointing_img_s" not in [r for r in s["records"] if r["what"] != "mae"][0]
    assert "ratio" in s["output"]
    assert "model.grad_checkpointing=selective" in s["output"]


def test_data_records(bench_results):
    (s,) = [s for s in bench_results if s["kind"] == "data"]
    assert [r["case"] for r in s["records"]] == ["cifar", "folder"]
    for r in s["records"]:
        assert r["workers"] == 2 and r["train_preset"] == "micro"
        for k in (
            "data_img_s",
            "data_overall_img_s",
            "train_img_s",
            "ratio",
            "cores_for_data",
            "fed_img_s",
            "fed_over_train",
            "mask_us_per_image",
        ):
            assert positive(r[k]), (k, r[k])
        assert r["ratio"] == pytest.approx(r["data_img_s"] / r["train_img_s"])
        assert r["training_waits"] is (r["ratio"] < 1)
        assert r["mask"] == "random 0.75" and r["files"] > 0
    assert s["records"][1]["files"] == 16  # the generated photo folder
    assert sum(ln.startswith(("cifar ", "folder ")) for ln in s["output"].splitlines()) == 2
    assert "training would" in s["output"] or "training WOULD" in s["output"]


def test_memory_records(bench_results):
    (s,) = [s for s in bench_results if s["kind"] == "memory"]
    recs = s["records"]
    assert [(r["preset"], r["batch"], r["grad_checkpointing"]) for r in recs] == [
        ("micro", 4, "off"),
        ("micro", 8, "off"),
        ("micro", 8, "selective"),
        ("micro", 8, "full"),
    ]  # '+ckpt' is the earlier spelling of '+full'
    assert len({r["pid"] for r in recs} | {os.getpid()}) == 5  # one fresh process each
    for r in recs:
        assert "error" not in r
        assert positive(r["peak_gib"]) and r["peak_gib"] >= r["rss_after_import_gib"] > 0
        assert isinstance(r["fits_limit"], bool)
    assert "# micro@8 fits in 8 GiB:" in s["output"]


def test_report(bench_results, tmp_path, monkeypatch, cifar_dir):
    monkeypatch.setattr(suite, "run_steps", lambda *a, **k: bench_results)
    out = tmp_path / "docs" / "performance.md"
    rc = suite.run_bench(str(out), quick=True, steps=micro_steps(cifar_dir), echo=False)
    assert rc == 0
    md = out.read_text()
    for head in (
        "# mimlab performance",
        "## Machine and software",
        "## Commands",
        "## Training step",
        "## Data pipeline",
        "## Peak memory",
        "## Console output",
    ):
        assert head in md
    assert "python benchmarks/bench_data.py" in md and "torch / torchvision" in md
    assert "| mae | micro | 4 |" in md and "| cifar | 32 | 2 | 8 |" in md
    assert "| mae | micro | 4 | selective |" in md and "| mae | micro | 4 | full |" in md
    assert "| micro + selective checkpointing | 8 |" in md
    assert "| micro + full checkpointing | 8 |" in md
    raw = json.loads(out.with_suffix(".json").read_text())
    assert raw["meta"]["versions"]["torch"] and raw["meta"]["machine"]["logical_cpus"] >= 1
    assert len(raw["results"]) == 3


def test_cli_bench_dry_run(capsys):
    assert cli.run(["bench", "--quick", "--dry-run"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [ln.split()[1] for ln in lines] == ["benchmarks/bench_train.py"] * 2 + [
        "benchmarks/bench_data.py",
        "benchmarks/bench_memory.py",
    ]
    assert cli.run(["bench", "--only", "memory,nope"]) == 2


def test_bench_is_found_from_the_checkout(tmp_path):
    """cwd first, then the checkout this mimlab was loaded from; the loaded module is reused."""
    assert cli.find_bench_suite(REPO) == REPO / "benchmarks" / "suite.py"
    assert cli.find_bench_suite(tmp_path) == REPO / "benchmarks" / "suite.py"  # editable install
    other = tmp_path / "benchmarks"
    other.mkdir()
    (other / "suite.py").write_text("")
    assert cli.find_bench_suite(tmp_path) == other / "suite.py"
    assert cli.load_bench_suite(REPO / "benchmarks" / "suite.py") is suite
    assert suite.TARGETS[("mae", "tiny")] == 1.5 and suite.GPU_REFERENCE_IMG_S > 0


def test_bench_outside_a_checkout_fails_in_one_line(tmp_path):
    """An installed mimlab (here: a copy of the package without benchmarks/ beside it), run from
    a folder that is not a checkout: one line on stderr, exit status 1."""
    shutil.copytree(
        REPO / "mimlab", tmp_path / "site" / "mimlab", ignore=shutil.ignore_patterns("__pycache__")
    )
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "site")}
    p = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys, mimlab.cli; "
            "assert mimlab.cli.__file__.startswith(sys.argv[1]); "
            "sys.exit(mimlab.cli.run(['bench', '--quick', '--dry-run']))",
            str(tmp_path / "site"),
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert p.returncode == 1, p.stderr
    assert p.stdout == "" and p.stderr.strip().splitlines() == [cli.BENCH_MISSING]


def test_target_rows_needed_fraction():
    """needed = target x reference img/s x GFLOP/img / peak; records without a target are left
    out; 'met' compares the measured ratio with the target."""
    recs = [
        {
            "what": "mae",
            "preset": "tiny",
            "batch": 128,
            "ratio": 1.2,
            "reference_img_s": 100.0,
            "gflops_per_image": 0.5,
            "matmul_peak_gflop_s": 150.0,
            "fraction_of_peak": 0.4,
        },
        {
            "what": "finetune",
            "preset": "tiny",
            "batch": 128,
            "ratio": 1.01,
            "compile": True,
            "reference_img_s": 50.0,
            "gflops_per_image": 2.0,
            "matmul_peak_gflop_s": 200.0,
            "fraction_of_peak": 0.505,
        },
        {
            "what": "mae",
            "preset": "micro",
            "batch": 4,
            "ratio": 9.0,
            "reference_img_s": 1.0,
            "gflops_per_image": 1.0,
            "matmul_peak_gflop_s": 1.0,
            "fraction_of_peak": 1.0,
        },
    ]
    rows = suite.target_rows(recs)
    assert [(r["what"], r["preset"]) for r in rows] == [("mae", "tiny"), ("finetune", "tiny")]
    assert rows[0]["target"] == 1.5 and rows[0]["met"] is False
    assert rows[0]["needed_fraction_of_peak"] == pytest.approx(1.5 * 100 * 0.5 / 150)
    assert rows[1]["met"] is True and rows[1]["compile"] is True
    assert rows[1]["needed_fraction_of_peak"] == pytest.approx(50 * 2.0 / 200)
    only = suite.target_rows(recs, {("mae", "micro"): 10.0})
    assert len(only) == 1 and only[0]["met"] is False


def render_train_records(records: list[dict], command: str = "mimlab bench") -> str:
    """The markdown report of one train step holding ``records`` (this machine's meta)."""
    meta = {
        "command": command,
        "date": "d",
        "seconds": 1.0,
        "quick": False,
        "machine": suite.machine_info(),
        "versions": suite.versions(),
    }
    return suite.render(
        meta,
        [
            {
                "name": "train",
                "kind": "train",
                "command": "c",
                "seconds": 1.0,
                "rc": 0,
                "records": records,
                "output": "",
            }
        ],
    )


def test_report_targets_section():
    rec = {
        "bench": "train",
        "what": "mae",
        "preset": "tiny",
        "batch": 128,
        "reps": 5,
        "threads": 2,
        "compile": True,
        "compile_seconds": 42.0,
        "mimlab_img_s": 150.0,
        "reference_name": "ref",
        "reference_img_s": 100.0,
        "ratio": 1.5,
        "gflops_per_image": 0.7,
        "mimlab_gflop_s": 105.0,
        "matmul_peak_gflop_s": 160.0,
        "fraction_of_peak": 105 / 160,
        "matmul_peak_bf16_gflop_s": 1.0,
    }
    md = render_train_records([rec])
    assert "| mae (compiled, 42 s to compile) | tiny | 128 |" in md
    assert "| mae | tiny | 128 | yes | 1.50x | 1.50x | yes | 66 % | 66 % |" in md
    assert "bf16 would not speed up training" in md


def test_report_gpu_record():
    """A CUDA bf16 record: labelled with the GPU and precision, summarised against the ~2,000
    images/s per A100 figure with its model-FLOPs utilisation, and kept out of the CPU targets
    and the CPU bf16 paragraph."""
    rec = {
        "bench": "train",
        "what": "mae",
        "preset": "vit_b16",
        "batch": 256,
        "reps": 10,
        "threads": 16,
        "compile": False,
        "device": "cuda",
        "precision": "bf16",
        "device_name": "NVIDIA H200",
        "mimlab_img_s": 3000.0,
        "reference_name": "ref",
        "reference_img_s": 2500.0,
        "ratio": 1.2,
        "gflops_per_image": 56.0,
        "mimlab_gflop_s": 168000.0,
        "matmul_peak_gflop_s": 700000.0,
        "fraction_of_peak": 0.24,
        "matmul_peak_bf16_gflop_s": 700000.0,
    }
    assert suite.target_rows([rec]) == []
    md = render_train_records([rec], "mimlab bench --gpu")
    assert "| mae [NVIDIA H200, bf16] | vit_b16 | 256 |" in md
    assert "MAE pretraining at 3,000 images/s per GPU (1.50x the ~2,000" in md
    assert "utilisation 24 % of the 700 TFLOP/s bf16 matmul peak" in md
    assert "Against the targets" not in md and "Lower precision" not in md
    assert suite.plan(gpu=True)[0].args[:4] == ["--device", "cuda", "--precision", "bf16"]


def test_memory_config_syntax(monkeypatch):
    monkeypatch.syspath_prepend(str(suite.benchmarks_dir()))
    import bench_memory

    assert bench_memory.parse_configs(
        "tiny@128, vit_b16@64+selective,vit_b16@64+full,a@2+ckpt"
    ) == [
        ("tiny", 128, "off"),
        ("vit_b16", 64, "selective"),
        ("vit_b16", 64, "full"),
        ("a", 2, "full"),
    ]
    for bad in ("tiny", "tiny@x", "tiny@8+", "tiny@8+fast"):
        with pytest.raises(SystemExit, match="PRESET@BATCH"):
            bench_memory.parse_configs(bad)
    assert (
        bench_memory.config_name({"preset": "p", "batch": 2, "grad_checkpointing": True})
        == "p@2+full"
    )
    assert (
        bench_memory.config_name({"preset": "p", "batch": 2, "grad_checkpointing": "off"}) == "p@2"
    )


def test_bench_train_under_autocast(monkeypatch):
    """--precision bf16 runs both steps under autocast (here on the CPU) and records it; the
    peak is measured in that precision."""
    monkeypatch.syspath_prepend(str(suite.benchmarks_dir()))
    import bench_train

    seen = []
    real = bench_train.matmul_peak_gflops
    monkeypatch.setattr(
        bench_train,
        "matmul_peak_gflops",
        lambda *a, **k: seen.append(k.get("dtype")) or real(*a, **k),
    )
    amps = []
    real_step = bench_train.make_step
    monkeypatch.setattr(
        bench_train, "make_step", lambda *a, **k: amps.append(k.get("amp")) or real_step(*a, **k)
    )
    r = bench_train.bench("micro", 2, 1, "mae", peak_size=64, precision="bf16")
    assert (r["device"], r["precision"]) == ("cpu", "bf16") and "device_name" not in r
    assert seen == [torch.bfloat16] and amps == [torch.bfloat16] * 2  # mimlab and reference
    for k in ("mimlab_img_s", "reference_img_s", "gflops_per_image", "matmul_peak_gflop_s"):
        assert positive(r[k]), k


# -------------------------------------------------- the official MAE code as a third peer
#: written for these tests (CI has no checkout of facebookresearch/mae): the interface of its
#: models_mae (constructor keywords, forward(imgs, mask_ratio) -> (loss, pred, mask)) and the
#: two things the benchmark's shims handle: Block(..., qk_scale=None) and numpy's np.float
STAND_IN_MODELS_MAE = """
import torch
import torch.nn as nn
from timm.models.vision_transformer import Block
from util.pos_embed import zero_positions

BUILT, FORWARDS = [], []


class MaskedAutoencoderViT(nn.Module):
    def __init__(self, img_size=224, patch_size=16, in_chans=3, embed_dim=1024, depth=24,
                 num_heads=16, decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16,
                 mlp_ratio=4.0, norm_layer=nn.LayerNorm, norm_pix_loss=False):
        super().__init__()
        BUILT.append(dict(img_size=img_size, patch_size=patch_size, embed_dim=embed_dim,
                          depth=depth, num_heads=num_heads, decoder_depth=decoder_depth,
                          norm_pix_loss=norm_pix_loss, eps=norm_layer(4).eps))
        self.p, dim = patch_size, patch_size ** 2 * in_chans
        self.embed = nn.Linear(dim, embed_dim)
        self.register_buffer("pos", torch.from_numpy(zero_positions(embed_dim)))
        self.blocks = nn.ModuleList(
            Block(embed_dim, num_heads, mlp_ratio, qkv_bias=True, qk_scale=None,
                  norm_layer=norm_layer)
            for _ in range(depth)
        )
        self.head = nn.Linear(embed_dim, dim)

    def forward(self, imgs, mask_ratio=0.75):
        FORWARDS.append(mask_ratio)
        b, c, _, _ = imgs.shape
        p = self.p
        x = imgs.unfold(2, p, p).unfold(3, p, p).permute(0, 2, 3, 1, 4, 5)
        x = x.reshape(b, -1, c * p * p)  # [B, N, C p p]
        mask = (torch.rand(b, x.shape[1]) < mask_ratio).float()  # [B, N], 1 = removed
        z = self.embed(x * (1 - mask)[..., None]) + self.pos
        for blk in self.blocks:
            z = blk(z)
        pred = self.head(z)  # [B, N, C p p]
        loss = (((pred - x) ** 2).mean(-1) * mask).sum() / mask.sum().clamp(min=1)
        return loss, pred, mask
"""
STAND_IN_POS_EMBED = """
import numpy as np


def zero_positions(dim):
    return np.zeros((1, dim), dtype=np.float).astype(np.float32)  # np.float: numpy < 1.24
"""


def official_stand_in(root: Path) -> Path:
    (root / "util").mkdir(parents=True)
    (root / "models_mae.py").write_text(STAND_IN_MODELS_MAE)
    (root / "util" / "pos_embed.py").write_text(STAND_IN_POS_EMBED)
    return root


@pytest.fixture
def bench_train(monkeypatch):
    monkeypatch.syspath_prepend(str(suite.benchmarks_dir()))
    monkeypatch.delenv("MIMLAB_OFFICIAL_MAE", raising=False)
    import bench_train

    return bench_train


def test_official_mae_path_with_a_stand_in(bench_train, tmp_path, monkeypatch, capsys):
    """--official-mae DIR: models_mae is imported from DIR (its ``util`` beside it), built
    through the shims (qk_scale dropped, np.float lent while it builds) with the preset's
    configuration and MAE's norm_pix_loss, timed in the alternation at the same mask ratio;
    nothing of it stays on sys.path, in sys.modules or in numpy. The report shows the third
    peer."""
    import numpy as np

    root = official_stand_in(tmp_path / "mae")
    mods = []
    real = bench_train.load_official_mae
    monkeypatch.setattr(
        bench_train, "load_official_mae", lambda d: mods.append(real(d)) or mods[-1]
    )
    jl = tmp_path / "r.jsonl"
    argv = ["bench_train.py", "--preset", "micro", "--batch", "2", "--what", "mae"]
    argv += ["--reps", "2", "--peak-size", "32", "--official-mae", str(root), "--json", str(jl)]
    monkeypatch.setattr(sys, "argv", argv)
    bench_train.main()
    (r,) = [json.loads(ln) for ln in jl.read_text().splitlines()]
    for k in ("official_img_s", "ratio_official", "peer_img_s", "ratio_peer", "ratio"):
        assert positive(r[k]), (k, r[k])
    assert r["official_name"] == bench_train.OFFICIAL_NAME and "official_absent" not in r
    assert r["official_dir"] == str(root) and r["official_commit"] is None  # not a checkout
    assert r["peer_img_s"] == max(r["reference_img_s"], r["official_img_s"])
    assert {k: len(v) for k, v in r["step_seconds"].items()} == dict.fromkeys(
        ("mimlab", "reference", "official"), 2
    )
    assert len(r["load_average_before"]) == len(r["load_average_after"]) == 3
    assert math.isclose(r["ratio_peer"], min(r["ratio"], r["ratio_official"]))
    out = capsys.readouterr().out
    assert "official MAE" in out and "mimlab / faster peer" in out
    # the import of main()'s early check, then the model's
    assert len(mods) == 2 and all(m.Block is bench_train._block_without_qk_scale for m in mods)
    (built,) = mods[1].BUILT
    assert built == dict(
        img_size=32,
        patch_size=8,
        embed_dim=32,
        depth=2,
        num_heads=2,
        decoder_depth=1,
        norm_pix_loss=True,
        eps=1e-6,
    )
    assert mods[1].FORWARDS == [0.75] * 3  # warm-up + 2 repetitions, MAE's mask ratio
    assert str(root) not in sys.path and "util" not in sys.modules
    assert "float" not in np.__dict__
    md = render_train_records([r])
    assert "| mae | micro | 2 |" in md and "MAE against both peers" in md
    assert "not measured" not in md


def test_qk_scale_shim(bench_train):
    """qk_scale=None (the official code's value: timm's default scale) is dropped; any other
    value would change the model and is refused."""
    from timm.models.vision_transformer import Block

    assert isinstance(bench_train._block_without_qk_scale(8, 2, 4.0, qk_scale=None), Block)
    with pytest.raises(ValueError, match="qk_scale"):
        bench_train._block_without_qk_scale(8, 2, qk_scale=0.5)


def test_without_official_mae_the_column_is_absent(bench_train, tmp_path, monkeypatch, capsys):
    """No --official-mae and no MIMLAB_OFFICIAL_MAE: the MAE step runs against HF alone, the
    official column is None with a one-line reason (console, JSON, report), and the faster peer
    is HF. A directory without models_mae.py stops in one line before any timing."""
    jl = tmp_path / "r.jsonl"
    argv = ["bench_train.py", "--preset", "micro", "--batch", "2", "--what", "mae"]
    argv += ["--reps", "1", "--peak-size", "32", "--json", str(jl)]
    monkeypatch.setattr(sys, "argv", argv)
    bench_train.main()
    (r,) = [json.loads(ln) for ln in jl.read_text().splitlines()]
    assert r["official_img_s"] is None and r["official_absent"] == bench_train.OFFICIAL_ABSENT
    assert "\n" not in r["official_absent"] and "ratio_official" not in r
    assert (r["peer_name"], r["peer_img_s"]) == (r["reference_name"], r["reference_img_s"])
    assert r["ratio_peer"] == r["ratio"]
    out = capsys.readouterr().out.splitlines()
    assert [ln for ln in out if "official" in ln] == [
        f"mae       micro    batch    2: {bench_train.OFFICIAL_ABSENT}"
    ]
    md = render_train_records([r])
    assert "| mae | micro | 2 |" in md and bench_train.OFFICIAL_ABSENT + " ('-' above)." in md
    monkeypatch.setattr(sys, "argv", [*argv, "--official-mae", str(tmp_path)])
    with pytest.raises(SystemExit) as e:
        bench_train.main()
    assert e.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.endswith(
        f"--official-mae {tmp_path}: no models_mae.py there (expected a checkout of "
        "github.com/facebookresearch/mae)"
    )
