"""Bad and unusual inputs a new user tries (issue 26): each case gives its exit code, one error
line on stderr, no traceback, and leaves an earlier finished run byte-identical (nothing lost,
nothing mixed). ``docs/reliability.md`` lists the same cases; ``python
tests/test_bad_inputs.py`` prints that table, and a test checks that the two agree.

Placeholders in a case's arguments: ``{data}`` labelled images, ``{out}`` the folder of runs
(holding the finished run ``done``), ``{ckpt}`` its ``last.pt``, ``{files}`` a folder of odd
files (``zero.pt`` empty, ``garbage.pt`` seeded random bytes, ``text.pt`` text, ``other.pt`` an
existing file, ``dir/`` a non-empty folder), ``{C}`` a tiny run's settings, ``{K}`` a tiny
k-NN's."""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "reliability.md"
TINY = (
    "model.preset=micro data.limit=32 optim.batch_size=16 optim.epochs=1 run.progress=false "
    "data.num_workers=0 run.device=cpu run.log_every=1"
)
#: a tiny k-NN run (``{K}``)
TINY_KNN = "data.limit=32 data.val_limit=16 run.progress=false data.num_workers=0 run.device=cpu"


@dataclass(frozen=True)
class Case:
    id: str
    group: str  # data (lost / mixed) | traceback | wrong success | clean (already one line)
    args: str
    rc: int
    message: str  # a fragment of the one error line


CASES = [
    # -- lost or mixed data
    Case(
        "rerun_finished_name",
        "data",
        "pretrain --data {data} --out {out} --name done {C}",
        1,
        "already holds a finished run; continue it with --resume auto, choose another --name, "
        "or pass --overwrite to replace it",
    ),
    Case(
        "run_dir_in_use",
        "data",
        "pretrain --data {data} --out {out} --name busy {C}",
        1,
        "is in use by process",
    ),
    Case(
        "export_onto_its_source",
        "data",
        "export {ckpt} {ckpt}",
        1,
        "is the source itself",
    ),
    Case(
        "export_pt_onto_existing_file",
        "data",
        "export {ckpt} {files}/other.pt",
        1,
        "exists; pass --overwrite to replace it",
    ),
    Case(
        "export_folder_onto_a_file",
        "data",
        "export {ckpt} {out}/done/config.yaml",
        1,
        "is a file; --format timm writes a folder",
    ),
    Case(
        "export_into_non_empty_folder",
        "data",
        "export {ckpt} {files}/dir",
        1,
        "is not empty; pass --overwrite",
    ),
    Case(
        "failed_run_leaves_no_folder",
        "data",
        "pretrain --data {files}/nope --out {out} --name failed {C}",
        1,
        "dataset path does not exist",
    ),
    Case(
        "too_few_images_leaves_no_folder",
        "data",
        "pretrain --data {data} --out {out}/new/sub --name small {C} optim.batch_size=64",
        1,
        "is smaller than one optimizer step",
    ),
    # -- were tracebacks
    Case(
        "resume_other_architecture",
        "traceback",
        "pretrain --data {data} --out {out} --name other --resume {ckpt} {C} model.depth=1",
        1,
        "does not fit this model",
    ),
    Case(
        "negative_base_lr",
        "traceback",
        "pretrain --data {data} --out {out} {C} optim.base_lr=-1",
        2,
        "optim.base_lr",
    ),
    Case(
        "log_every_zero",
        "traceback",
        "pretrain --data {data} --out {out} {C} run.log_every=0",
        2,
        "run.log_every must be",
    ),
    Case(
        "cuda_without_gpu",
        "traceback",
        "pretrain --data {data} --out {out} {C} run.device=cuda",
        2,
        "no CUDA GPU",
    ),
    Case(
        "knn_temperature_zero",
        "traceback",
        "knn --data {data} --out {out} {K} probe.temperature=0",
        2,
        "probe.temperature must be > 0",
    ),
    # -- were wrong successes
    Case(
        "negative_weight_decay",
        "wrong success",
        "pretrain --data {data} --out {out} {C} optim.weight_decay=-1",
        2,
        "optim.weight_decay must be >= 0",
    ),
    Case(
        "negative_clip_grad",
        "wrong success",
        "pretrain --data {data} --out {out} {C} optim.clip_grad=-1",
        2,
        "optim.clip_grad must be > 0",
    ),
    Case(
        "repeat_zero",
        "wrong success",
        "pretrain --data {data} --out {out} {C} data.repeat=0",
        2,
        "data.repeat must be",
    ),
    Case(
        "knn_resume",
        "wrong success",
        "knn --data {data} --out {out} {K} --resume {ckpt}",
        2,
        "knn and linprobe have nothing to resume",
    ),
    # -- checkpoint files
    Case(
        "zero_byte_checkpoint",
        "traceback",
        "knn --data {data} --out {out} {K} --pretrained {files}/zero.pt",
        1,
        "the file is empty (0 bytes)",
    ),
    Case(
        "random_bytes_checkpoint",
        "clean",
        "knn --data {data} --out {out} {K} --pretrained {files}/garbage.pt",
        1,
        "the file is corrupt or not a torch checkpoint",
    ),
    Case(
        "text_file_as_checkpoint",
        "clean",
        "pretrain --data {data} --out {out} --name t --resume {files}/text.pt {C}",
        1,
        "safe loading (weights_only) refused it",
    ),
    Case(
        "missing_resume_checkpoint",
        "clean",
        "pretrain --data {data} --out {out} --name m --resume {files}/nope.pt {C}",
        1,
        "checkpoint not found",
    ),
    Case(
        "finetune_missing_pretrained",
        "clean",
        "finetune --data {data} --out {out} {C} --pretrained {files}/nope.pt",
        1,
        "checkpoint not found",
    ),
    Case("export_missing_source", "clean", "export {files}/nope.pt {files}/x", 1, "not found"),
    Case(
        "export_unknown_source_kind",
        "clean",
        "export nope:x {files}/x",
        1,
        "unknown model source 'nope:'",
    ),
    # -- configs and the command line (already one line)
    Case(
        "unknown_key",
        "clean",
        "pretrain --data {data} --out {out} {C} optim.epoch=3",
        2,
        "did you mean 'optim.epochs'?",
    ),
    Case(
        "wrong_type",
        "clean",
        "pretrain --data {data} --out {out} {C} optim.epochs=abc",
        2,
        "optim.epochs: expected an integer",
    ),
    Case(
        "knn_with_optim_key",
        "clean",
        "knn --data {data} --out {out} {K} optim.epochs=5",
        2,
        "unknown config key 'optim'",
    ),
    Case("unknown_model_preset", "clean", "pretrain model.preset=nope", 2, "unknown preset"),
    Case("unknown_method", "clean", "pretrain method.name=nope", 2, "unknown method 'nope'"),
    Case(
        "mask_ratio_out_of_range",
        "clean",
        "pretrain method.mask_ratio=1.5",
        2,
        "method.mask_ratio must be in (0, 1)",
    ),
    Case(
        "img_size_not_divisible",
        "clean",
        "pretrain model.img_size=30",
        2,
        "is not divisible by model.patch_size",
    ),
    Case(
        "zero_epochs",
        "clean",
        "pretrain --data {data} --out {out} {C} optim.epochs=0",
        2,
        "optim.epochs must be >= 1",
    ),
    Case(
        "zero_batch",
        "clean",
        "pretrain --data {data} --out {out} {C} optim.batch_size=0",
        2,
        "optim.batch_size must be",
    ),
    Case(
        "zero_max_steps",
        "clean",
        "pretrain --data {data} --out {out} {C} run.max_steps=0",
        2,
        "run.max_steps must be",
    ),
    Case(
        "unknown_device",
        "clean",
        "pretrain --data {data} --out {out} {C} run.device=gpu",
        2,
        "run.device must be",
    ),
    Case(
        "missing_config_file",
        "clean",
        "pretrain --config {files}/nope.yaml",
        2,
        "config file not found",
    ),
    Case(
        "yaml_with_python_tag",
        "clean",
        "pretrain --config {files}/tag.yaml",
        2,
        "not valid YAML",
    ),
    Case(
        "missing_data", "clean", "pretrain --data {files}/nope --out {out} {C}", 1, "does not exist"
    ),
    Case(
        "data_is_a_file",
        "clean",
        "pretrain --data {files}/other.pt --out {out} {C}",
        1,
        "is not a folder",
    ),
    Case("unknown_command", "clean", "frobnicate", 2, "invalid choice: 'frobnicate'"),
    Case("unknown_option", "clean", "pretrain --epochs 3", 2, "unrecognized arguments"),
    Case(
        "bad_export_format",
        "clean",
        "export {ckpt} {files}/x --format onnx",
        2,
        "invalid choice: 'onnx'",
    ),
]
#: cases run in a subprocess (signals, pipes): see the tests below
SPECIAL = [
    Case(
        "print_config_into_closed_pipe",
        "traceback",
        "pretrain --print-config | head -2",
        141,
        "(nothing: the reader left)",
    ),
    Case(
        "ctrl_c_before_training",
        "traceback",
        "Ctrl-C during imports / data scan",
        130,
        "mimlab: interrupted (Ctrl-C)",
    ),
]

LOG_LINE = re.compile(r"^\d\d:\d\d:\d\d (DEBUG|INFO|WARNING|ERROR) ")


def _digest(d: Path) -> dict[str, str]:
    return {
        str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(d.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def world(cifar_dir, tmp_path_factory):
    from mimlab.cli import run

    out = tmp_path_factory.mktemp("runs")
    files = tmp_path_factory.mktemp("files")
    assert (
        run(["pretrain", f"--data={cifar_dir}", f"--out={out}", "--name=done", *TINY.split()]) == 0
    )
    assert (out / "done/results.json").is_file()
    (files / "zero.pt").write_bytes(b"")
    (files / "garbage.pt").write_bytes(random.Random(0).randbytes(300))
    (files / "text.pt").write_text("not a checkpoint\n")
    (files / "other.pt").write_bytes(b"an existing file")
    (files / "dir").mkdir()
    (files / "dir" / "keep.txt").write_text("keep")
    (files / "tag.yaml").write_text("x: !!python/object/apply:os.system ['true']\n")
    busy = out / "busy"  # a run directory locked by a live process (this one's parent)
    busy.mkdir()
    (busy / "config.yaml").write_text("run: {}\n")
    (busy / ".lock").write_text(json.dumps({"pid": os.getppid(), "host": os.uname().nodename}))
    return {"data": str(cifar_dir), "out": str(out), "files": str(files)}


def _fill(args: str, w: dict) -> list[str]:
    text = args.replace("{C}", TINY).replace("{K}", TINY_KNN)
    text = text.replace("{ckpt}", f"{w['out']}/done/checkpoints/last.pt")
    for k, v in w.items():
        text = text.replace("{" + k + "}", v)
    return text.split()


def error_lines(err: str) -> list[str]:
    """stderr without the log lines (``HH:MM:SS LEVEL name: ...``)."""
    return [ln for ln in err.splitlines() if ln.strip() and not LOG_LINE.match(ln)]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_gives_one_line(case, world, capsys):
    import torch

    from mimlab.cli import run

    if case.id == "cuda_without_gpu" and torch.cuda.is_available():
        pytest.skip("a GPU is present")
    out, files = Path(world["out"]), Path(world["files"])
    before = _digest(out)
    before_files = _digest(files)
    capsys.readouterr()
    try:
        rc = run(_fill(case.args, world))
    except SystemExit as e:  # argparse usage errors
        rc = e.code
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = error_lines(err)
    assert len(lines) == 1, lines
    assert lines[0].startswith("mimlab: "), lines
    assert case.message in lines[0], lines[0]
    assert rc == case.rc, (rc, lines[0])
    # nothing lost, nothing mixed, nothing left behind: every earlier file byte-identical, no
    # new run folder (a failed run removes the folder it created)
    assert _digest(out) == before
    assert _digest(files) == before_files
    assert sorted(p.name for p in out.iterdir()) == ["busy", "done"]


def test_overwrite_replaces_and_resume_continues(world, tmp_path, capsys):
    """The explicit choices: --overwrite replaces an earlier run (one set of rows, not two),
    --resume auto continues it; a stale lock (dead process) is taken over with a warning."""
    import shutil

    from mimlab.cli import run

    src = Path(world["out"]) / "done"
    shutil.copytree(src, tmp_path / "done")
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], text=True, capture_output=True
    ).stdout.strip()
    (tmp_path / "done/.lock").write_text(
        json.dumps({"pid": int(dead), "host": os.uname().nodename})
    )
    base = [
        "pretrain",
        f"--data={world['data']}",
        f"--out={tmp_path}",
        "--name=done",
        *TINY.split(),
    ]
    assert run(base + ["--resume=auto"]) == 0
    assert "removing the stale lock" in capsys.readouterr().err
    assert (tmp_path / "done/metrics.jsonl").read_bytes() == (src / "metrics.jsonl").read_bytes()
    assert run(base + ["--overwrite", "run.seed=1"]) == 0
    rows = [json.loads(x) for x in (tmp_path / "done/metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["kind"] == "train"] == [1, 2]
    assert "seed: 1" in (tmp_path / "done/config.yaml").read_text()
    assert not (tmp_path / "done/.lock").exists()  # released at the end


def test_export_overwrite_is_explicit(world, tmp_path, capsys):
    from mimlab.cli import run

    ckpt = f"{world['out']}/done/checkpoints/last.pt"
    (tmp_path / "e.pt").write_bytes(b"old")
    assert run(["export", ckpt, str(tmp_path / "e.pt"), "--overwrite"]) == 0
    assert (tmp_path / "e.pt").stat().st_size > 1000
    assert run(["export", ckpt, ckpt, "--overwrite"]) == 1  # never onto its source
    assert "is the source itself" in capsys.readouterr().err


def test_python_api_releases_its_lock_on_failure(world, tmp_path):
    from mimlab import tasks
    from mimlab.core.config import PretrainConfig, resolve
    from mimlab.train.engine import TrainingError

    ov = [f"data.path={world['data']}", f"run.out_dir={tmp_path}", "run.name=x", *TINY.split()]
    cfg = resolve(PretrainConfig, overrides=ov + ["optim.batch_size=64"])
    with pytest.raises(TrainingError, match="smaller than one optimizer step"):
        tasks.pretrain(cfg)
    assert (tmp_path / "x/config.yaml").is_file() and not (tmp_path / "x/.lock").exists()


def _cli(*args, **kw):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    return subprocess.Popen(
        [sys.executable, "-m", "mimlab.cli", *args],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kw,
    )


def test_two_runs_on_one_directory(world, tmp_path):
    """A second process on a running run's directory fails at once, naming the holder; the
    first run finishes undisturbed."""
    import time

    args = ["pretrain", f"--data={world['data']}", f"--out={tmp_path}", "--name=r", *TINY.split()]
    first = _cli(*args, "optim.epochs=200", "data.limit=16")
    lock = tmp_path / "r/.lock"
    t0 = time.time()
    while not lock.exists():
        assert first.poll() is None and time.time() - t0 < 120, first.communicate()
        time.sleep(0.05)
    second = _cli(*args)
    _, err = second.communicate(timeout=120)
    first.send_signal(signal.SIGTERM)
    first.communicate(timeout=120)
    assert second.returncode == 1
    lines = error_lines(err)
    assert len(lines) == 1 and f"is in use by process {first.pid}" in lines[0], err
    assert (tmp_path / "r/checkpoints/last.pt").is_file()  # the first run's, not mixed


@pytest.mark.parametrize("reader", ["head -2", "true"])
def test_print_config_into_a_closed_pipe(reader):
    p = subprocess.run(
        f"{sys.executable} -m mimlab.cli pretrain --print-config | {reader}",
        shell=True,
        cwd=REPO,
        env=dict(os.environ, PYTHONPATH=str(REPO)),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert len(p.stdout.splitlines()) == (2 if reader.startswith("head") else 0)
    assert p.stderr == "", p.stderr


def test_ctrl_c_before_training_is_one_line(monkeypatch, capsys):
    """Ctrl-C while imports or the data scan run (before the engine's own handler)."""
    import mimlab.cli as cli

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_resolve_cmd", interrupted)
    monkeypatch.setattr(sys, "argv", ["mimlab", "pretrain"])
    with pytest.raises(SystemExit) as e:
        cli.main()
    assert e.value.code == 130
    assert capsys.readouterr().err.strip() == "mimlab: interrupted (Ctrl-C)"


# ------------------------------------------------------------------ friction a newcomer meets
def test_probe_help_examples_are_probe_keys(capsys):
    from mimlab.cli import run
    from mimlab.core.config import ProbeConfig, resolve

    with pytest.raises(SystemExit):
        run(["knn", "--help"])
    out = capsys.readouterr().out
    assert "optim.epochs=5" not in out and "e.g. probe.k=10 data.limit=1000" in out
    assert resolve(ProbeConfig, overrides=["probe.k=10", "data.limit=1000"]).probe.k == 10


def test_a_run_logs_its_normalisation(world):
    log = (Path(world["out"]) / "done/log.txt").read_text()
    assert re.search(r"normalisation: mean \[[0-9., ]+\], std \[[0-9., ]+\] from ", log), log


def test_timm_export_names_no_foreign_weights_and_is_readable(world, tmp_path):
    from mimlab.cli import run

    assert run(["export", f"{world['out']}/done/checkpoints/last.pt", str(tmp_path / "t")]) == 0
    cfg = json.loads((tmp_path / "t/config.json").read_text())
    assert "tag" not in cfg["pretrained_cfg"] and "license" not in cfg["pretrained_cfg"]
    assert cfg["model_args"]["embed_dim"] == 32  # the real size
    mask = os.umask(0)
    os.umask(mask)
    assert (tmp_path / "t/model.safetensors").stat().st_mode & 0o777 == 0o666 & ~mask


def test_hf_export_keeps_pooling_and_its_feature_recipe_holds(world, tmp_path, caplog):
    transformers = pytest.importorskip("transformers")
    import logging

    import torch

    from mimlab.io.export import export_checkpoint
    from mimlab.io.sources import load_encoder

    ckpt = f"{world['out']}/done/checkpoints/last.pt"
    info = export_checkpoint(ckpt, tmp_path / "h", "hf")
    sm = load_encoder(ckpt)
    assert sm.pool == "avg" and "mean of the patch tokens" in info["features"]
    with caplog.at_level(logging.INFO, logger="mimlab.sources"):
        back = load_encoder(f"hf:{tmp_path / 'h'}")
    assert back.pool == "avg" and "pooling avg" in caplog.text
    # the documented recipe gives mimlab's features
    enc = transformers.ViTMAEForPreTraining.from_pretrained(str(tmp_path / "h"), mask_ratio=0.0)
    enc = enc.vit.eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        noise = torch.arange(16, dtype=torch.float).expand(2, 16)
        h = enc(pixel_values=x, noise=noise).last_hidden_state
        assert (h[:, 1:].mean(1) - sm.features(x)).abs().max() < 1e-5


def test_config_errors_come_before_torch_is_imported():
    code = (
        "import sys; from mimlab.cli import run; "
        "rc = run(['pretrain', 'optim.epoch=3']); print(rc, 'torch' in sys.modules)"
    )
    p = subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO,
        env=dict(os.environ, PYTHONPATH=str(REPO)),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert p.stdout.strip() == "2 False", (p.stdout, p.stderr[-2000:])
    assert "did you mean 'optim.epochs'?" in p.stderr


def test_building_models_does_not_import_wandb():
    code = "import sys, mimlab.io.sources, mimlab.nn.models; print('wandb' in sys.modules)"
    p = subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO,
        env=dict(os.environ, PYTHONPATH=str(REPO)),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert p.stdout.strip() == "False", p.stderr[-2000:]


# ------------------------------------------------------------------ the table in the docs
def doc_table() -> str:
    """The markdown table of ``docs/reliability.md``'s section 'Bad inputs'."""
    rows = [
        "| case | input | exit | the one line says |",
        "|---|---|---|---|",
    ]
    for c in CASES + SPECIAL:
        args = c.args.replace("|", "\\|")
        rows.append(f"| `{c.id}` ({c.group}) | `{args}` | {c.rc} | {c.message} |")
    return "\n".join(rows)


def test_docs_list_every_case_with_its_message():
    text = DOC.read_text()
    assert doc_table() in text, "docs/reliability.md is stale: python tests/test_bad_inputs.py"
    listed = set(re.findall(r"^\| `([a-z0-9_]+)` \(", text, flags=re.M))
    assert listed == {c.id for c in CASES + SPECIAL}


if __name__ == "__main__":
    print(doc_table())
