"""Logged metrics across a resume, and log output under torchrun (non-zero ranks)."""

import json
import logging
import re

import torch
from conftest import micro_pretrain_cfg

from mimlab import tasks
from mimlab.core import dist
from mimlab.train.engine import LogWindow


def _cfg(data, out, name, *extra):
    return micro_pretrain_cfg(data, out, name, *extra, log_every=4)


def _rows(d):
    rows = [json.loads(l) for l in (d / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "images_per_s"} for r in rows]


def test_window_spanning_a_resume_logs_the_uninterrupted_rows(cifar_dir, tmp_path):
    # log every 4 steps, stop after step 5: the row at step 8 averages steps 5-8, one of
    # them from before the interruption; it also spans the epoch end at step 6
    tasks.pretrain(_cfg(cifar_dir, tmp_path, "full"))
    tasks.pretrain(_cfg(cifar_dir, tmp_path, "split", "run.stop_at_step=5"))
    ck = torch.load(tmp_path / "split/checkpoints/last.pt", weights_only=True)
    assert ck["log_window"]["n"] == 1 and "loss" in ck["log_window"]["sums"]
    tasks.pretrain(_cfg(cifar_dir, tmp_path, "split", "run.resume=auto"))
    full, split = _rows(tmp_path / "full"), _rows(tmp_path / "split")
    assert [r["step"] for r in full if r["kind"] == "train"] == [4, 8, 12]
    assert full == split  # every field, bitwise


def test_log_window_means_and_state_round_trip():
    w = LogWindow()
    w.add({"loss": torch.tensor(1.0), "acc": torch.tensor(0.5), "map": torch.ones(3)}, 8)
    w.add({"loss": torch.tensor(2.0), "acc": torch.tensor(1.0)}, 8)
    assert w.means() == {"loss": 1.5, "acc": 0.75} and w.images == 16
    v = LogWindow()
    v.load(w.state())
    assert v.means() == w.means() and v.images == 0
    v.load(None)  # checkpoint without a window
    assert v.means() == {} and v.n == 0


def test_non_zero_ranks_log_warnings_only_in_the_same_format(monkeypatch, capsys):
    root = logging.getLogger()
    monkeypatch.setattr(root, "handlers", [])
    logging.basicConfig(level=logging.WARNING)  # what `mimlab` (cli.main) does
    monkeypatch.setattr(dist, "is_main", lambda: False)
    try:
        tasks.setup_logging(None)
        log = logging.getLogger("mimlab.engine")
        log.info("pretrain mae on 1024 images")
        log.warning("something odd")
        err = capsys.readouterr().err
        assert "pretrain mae" not in err  # neither formatted nor via root
        lines = [ln for ln in err.splitlines() if ln.strip()]
        assert len(lines) == 1 and re.fullmatch(
            r"\d\d:\d\d:\d\d WARNING mimlab\.engine: something odd", lines[0]
        ), lines
        monkeypatch.setattr(dist, "is_main", lambda: True)
        tasks.setup_logging(None)
        log.info("rank zero info")
        assert re.search(
            r"\d\d:\d\d:\d\d INFO mimlab\.engine: rank zero info", capsys.readouterr().err
        )
    finally:
        tasks.setup_logging(None)
