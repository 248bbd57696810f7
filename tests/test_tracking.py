"""Optional W&B / MLflow sinks (log.wandb, log.mlflow), offline; never imported unless enabled."""

import json
import struct
import sys
from pathlib import Path

import pytest

from mimlab import tasks
from mimlab.core.config import ConfigError, PretrainConfig, resolve


def _cfg(data, out, name, *extra):
    return resolve(
        PretrainConfig,
        overrides=[
            "model.preset=micro",
            f"data.path={data}",
            "data.limit=64",
            "optim.batch_size=16",
            "optim.epochs=1",
            "run.log_every=1",
            "run.progress=false",
            f"run.out_dir={out}",
            f"run.name={name}",
            "data.num_workers=0",
            *extra,
        ],
    )


def _train_losses(d: Path) -> dict[int, float]:
    rows = [json.loads(l) for l in (d / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if r["kind"] == "train"}


def test_sinks_are_not_imported_unless_enabled(cifar_dir, tmp_path, monkeypatch):
    # an entry of None in sys.modules makes any `import wandb` / `import mlflow` raise
    monkeypatch.setitem(sys.modules, "wandb", None)
    monkeypatch.setitem(sys.modules, "mlflow", None)
    res = tasks.pretrain(_cfg(cifar_dir, tmp_path, "plain"))
    assert res["steps"] == 4
    with pytest.raises(ConfigError, match=r"log.wandb=true needs the wandb package: pip install"):
        tasks.pretrain(_cfg(cifar_dir, tmp_path, "w", "log.wandb=true"))
    with pytest.raises(ConfigError, match=r"log.mlflow=true needs the mlflow package"):
        tasks.pretrain(_cfg(cifar_dir, tmp_path, "m", "log.mlflow=true"))


def _wandb_history(run_file: Path) -> list[dict]:
    """History rows of an offline W&B run file (LevelDB-log framing: 7-byte file header, 32 KiB
    blocks of records with a 7-byte header crc32/length/type; type 1 full, 2-4 first/middle/
    last fragment), each record a wandb_internal_pb2.Record."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = run_file.read_bytes()
    assert data[:4] == b":W&B"
    pos, block, payload, rows = 7, 32768, b"", []
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunk = data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind == 0:
            continue
        payload = chunk if kind in (1, 2) else payload + chunk
        if kind in (1, 4):
            rec = pb.Record()
            rec.ParseFromString(payload)
            if rec.WhichOneof("record_type") == "history":
                rows.append(
                    {
                        it.key or "/".join(it.nested_key): json.loads(it.value_json)
                        for it in rec.history.item
                    }
                )
    return rows


def test_wandb_offline_run_holds_the_logged_losses(cifar_dir, tmp_path, monkeypatch):
    pytest.importorskip("wandb", reason="wandb not installed (pip install 'mimlab[track]')")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    tasks.pretrain(_cfg(cifar_dir, tmp_path, "wb", "log.wandb=true"))
    d = tmp_path / "wb"
    (run_file,) = list(d.glob("wandb/offline-run-*/run-*.wandb"))
    hist = _wandb_history(run_file)
    got = {int(r["_step"]): r["train/loss"] for r in hist if "train/loss" in r}
    assert got == pytest.approx(_train_losses(d), abs=0, rel=1e-12) and len(got) == 4


def test_mlflow_file_store_holds_the_logged_losses(cifar_dir, tmp_path):
    pytest.importorskip("mlflow", reason="mlflow not installed (pip install 'mimlab[track]')")
    from mlflow import MlflowClient

    tasks.pretrain(_cfg(cifar_dir, tmp_path, "ml", "log.mlflow=true"))
    d = tmp_path / "ml"
    client = MlflowClient((d / "mlruns").resolve().as_uri())
    run_id = (d / "mlflow_run_id").read_text()
    hist = client.get_metric_history(run_id, "train/loss")
    assert {m.step: m.value for m in hist} == _train_losses(d)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.params["method.name"] == "mae"
