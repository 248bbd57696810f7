"""Online k-NN / linear-probe evaluation during pretraining (eval.online_every)."""

import json
from pathlib import Path

import pytest
import torch
from conftest import micro_pretrain_cfg

from mimlab import tasks
from mimlab.core.config import ConfigError
from mimlab.methods import build_method
from mimlab.nn.knn import knn_classify, top1
from mimlab.train.online import build_online_evaluator

ONLINE = [
    "eval.online_bank=60",
    "eval.online_queries=30",
    "eval.online_probe=true",
    "eval.online_probe_epochs=5",
]


def _cfg(data, out, name, *extra):
    return micro_pretrain_cfg(data, out, name, *extra)


def _rows(d: Path, kind: str) -> list[dict]:
    rows = [json.loads(l) for l in (d / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["kind"] == kind]


def test_knn_weighted_vote_by_hand():
    bank = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 1.0], [0.2, 1.0]])
    labels = torch.tensor([0, 0, 1, 1, 1])
    q = torch.tensor([[1.0, 0.05]])
    # k=5: class 1 has three neighbours but with cosine ~0.05-0.24 their exp(s/T) votes are
    # tiny next to class 0's two neighbours at cosine ~1
    assert knn_classify(bank, labels, q, 5, 0.07, 2).tolist() == [0]
    # a huge temperature makes the vote nearly unweighted: the majority (class 1) wins
    assert knn_classify(bank, labels, q, 5, 1e6, 2).tolist() == [1]
    assert top1(torch.tensor([0, 1, 1, 2]), torch.tensor([0, 1, 2, 2])) == 75.0


@pytest.fixture(scope="module")
def runs(cifar_dir, tmp_path_factory):
    """The same micro pretraining with online evaluation off and on (every 5 steps)."""
    out = tmp_path_factory.mktemp("online")
    off = tasks.pretrain(_cfg(cifar_dir, out, "noeval"))
    on = tasks.pretrain(_cfg(cifar_dir, out, "witheval", "eval.online_every=5", *ONLINE))
    return out, off, on


def test_online_eval_leaves_training_bitwise_unchanged(runs):
    out, off, on = runs
    a = [(r["step"], r["loss"]) for r in _rows(out / "noeval", "train")]
    b = [(r["step"], r["loss"]) for r in _rows(out / "witheval", "train")]
    assert len(a) == 12 and a == b  # bitwise equal losses
    wa = torch.load(out / "noeval/checkpoints/last.pt", weights_only=True)["model"]
    wb = torch.load(out / "witheval/checkpoints/last.pt", weights_only=True)["model"]
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_online_rows_curve_and_results(runs):
    out, _, on = runs
    rows = _rows(out / "witheval", "online")
    assert [r["step"] for r in rows] == [0, 5, 10, 12]  # start, every 5, last step
    for r in rows:
        assert 0 <= r["knn_top1"] <= 100 and 0 <= r["probe_top1"] <= 100
        assert r["images_seen"] == 16 * r["step"]
        assert (r["knn_top1"] * 30 / 100) == pytest.approx(round(r["knn_top1"] * 30 / 100))
    assert on["online"]["knn_top1"] == rows[-1]["knn_top1"]
    png = out / "witheval/online_eval.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    header = (out / "witheval/metrics.csv").read_text().splitlines()[0].split(",")
    assert {"knn_top1", "probe_top1", "images_seen"} <= set(header)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(out / "witheval/tb"))
    ea.Reload()
    assert [e.step for e in ea.Scalars("online/knn_top1")] == [0, 5, 10, 12]


def test_online_value_is_the_final_weights_knn(runs, cifar_dir):
    """The last online row equals an independent evaluation of the saved final weights."""
    out, _, _ = runs
    cfg = _cfg(cifar_dir, out, "witheval", "eval.online_every=5", *ONLINE)
    method = build_method(cfg)
    method.load_state_dict(
        torch.load(out / "witheval/checkpoints/last.pt", weights_only=True)["model"]
    )
    ds_mean, ds_std = (
        json.loads((out / "witheval/results.json").read_text())["data_mean"],
        json.loads((out / "witheval/results.json").read_text())["data_std"],
    )
    ev = build_online_evaluator(
        cfg.eval, cfg.data, cfg.model, cfg.run.seed, ds_mean, ds_std, torch.device("cpu"), out
    )
    got = ev(method, 12)
    last = _rows(out / "witheval", "online")[-1]
    assert got["knn_top1"] == last["knn_top1"] and got["probe_top1"] == last["probe_top1"]
    # fixed, class-balanced subsets: 60 bank images = 6 per CIFAR class, 30 queries = 3 each
    labels = [ev.bank.dataset.labels[i] for i in ev.bank.indices]
    assert len(labels) == 60 and all(labels.count(c) == 6 for c in range(10))


def test_online_curve_continues_across_resume(runs, cifar_dir):
    out, _, _ = runs
    ex = ["eval.online_every=5", *ONLINE]
    tasks.pretrain(_cfg(cifar_dir, out, "split", *ex, "run.stop_at_step=7"))
    assert [r["step"] for r in _rows(out / "split", "online")] == [0, 5]
    tasks.pretrain(_cfg(cifar_dir, out, "split", *ex, "run.resume=auto"))
    drop = ("eval_s",)
    a = [{k: v for k, v in r.items() if k not in drop} for r in _rows(out / "witheval", "online")]
    b = [{k: v for k, v in r.items() if k not in drop} for r in _rows(out / "split", "online")]
    assert a == b


def test_online_eval_without_labels_fails_in_one_line(tmp_path):
    from tests.conftest import make_imagefolder

    flat = tmp_path / "flat"
    make_imagefolder(tmp_path / "tmp", splits=("train",))
    flat.mkdir()
    for i, p in enumerate(sorted((tmp_path / "tmp/train").rglob("*.png"))):
        p.rename(flat / f"{i}.png")
    cfg = _cfg(flat, tmp_path, "x", "eval.online_every=5", "data.limit=24", "data.train_split=")
    with pytest.raises(ConfigError) as e:
        tasks.pretrain(cfg)
    msg = str(e.value)
    assert "\n" not in msg and "eval.online_every=5 needs labelled data" in msg
    assert "eval.online_every=0" in msg
