"""mimlab.data.shards: WebDataset tar shards (writing, the per-rank / per-worker epoch plan,
streams, resume) and Hugging Face datasets on disk. DDP ranks and DataLoader workers are simulated
in one process (rank/world arguments, a patched ``get_worker_info``); one test runs a real
2-worker DataLoader to check the batch order the plan relies on."""

from __future__ import annotations

import hashlib
import io
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from mimlab.core.config import DataConfig
from mimlab.data import shards as S
from mimlab.data.datasets import (
    BadImageError,
    DataError,
    ShardDecoder,
    build_dataset,
    detect_kind,
    load_image,
    scan_source,
    subset_indices,
    write_folder_shards,
)

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import make_imagefolder  # noqa: E402

wds = pytest.importorskip(
    "webdataset",
    reason="tar shards need the optional webdataset package (pip install 'mimlab[data]')",
)


# ------------------------------------------------------------------------ helpers
def _write_keyed_shards(root: Path, lengths: list[int]) -> S.ShardSplit:
    """Shards whose sample k (in split order) is an 'id' entry holding k and a .cls of k % 3."""
    root.mkdir(parents=True, exist_ok=True)
    files, k = [], 0
    for s, n in enumerate(lengths):
        f = root / f"train-{s:06d}.tar"
        with wds.TarWriter(str(f), encoder=False, mtime=0) as w:
            for _ in range(n):
                w.write({"__key__": f"{k:08d}", "id": str(k).encode(), "cls": str(k % 3).encode()})
                k += 1
        files.append(str(f))
    return S.ShardSplit("train", files, list(lengths), ["a", "b", "c"])


def _id_stream(split: S.ShardSplit, **kw) -> S.ShardStream:
    """A stream whose 'image' is the sample's id (no decoding, no augmentation)."""

    def decode(sample, where):
        return torch.tensor(int(sample["id"])), int(sample["cls"])

    return S.ShardStream(split, decode, lambda img, epoch, index: img, **kw)


def _worker_outputs(ds: S.ShardStream, worker: int, workers: int, monkeypatch) -> list[int]:
    """What DataLoader worker ``worker`` of ``workers`` would produce, run in this process."""
    with monkeypatch.context() as m:
        m.setattr(S, "get_worker_info", lambda: SimpleNamespace(id=worker, num_workers=workers))
        return [int(b.images) for b in ds]


def _rank_batches(stream, batch, epoch, rank, world, workers, monkeypatch, start=0):
    """The rank's batch sequence as a DataLoader assembles it: batches taken from the workers
    in turn (batch k from worker k % workers), skipping workers that are done."""
    loader = stream.make_loader(
        batch, 0, epoch, start=start, rank=rank, world=world, num_workers=workers
    )
    per = [
        _worker_outputs(loader.dataset, w, max(1, workers), monkeypatch)
        for w in range(max(1, workers))
    ]
    chunks = [[p[i : i + batch] for i in range(0, len(p), batch)] for p in per]
    for c in chunks:
        assert all(len(b) == batch for b in c)  # every worker delivers whole batches
    out, i = [], 0
    while any(chunks):
        if chunks[i % len(chunks)]:
            out.append(chunks[i % len(chunks)].pop(0))
        i += 1
    return out, len(loader.dataset)


# ------------------------------------------------------------------------ the epoch plan
def test_plan_two_ranks_two_workers_disjoint_and_covering():
    lengths = [7, 5, 9, 3, 8]  # 32 samples, uneven shards
    n, world, slots, batch = sum(lengths), 2, 2, 3

    def positions(plan):
        order = S.shard_order(len(lengths), 0, 4, True)
        base = {s: sum(lengths[t] for t in order[: order.index(s)]) for s in order}
        return [base[p.shard] + j for p in plan.pieces for j in range(p.start, p.stop)]

    got = []
    for rank in range(world):
        for slot in range(slots):
            plan = S.plan_slot(
                lengths,
                seed=0,
                epoch=4,
                shuffle=True,
                rank=rank,
                world=world,
                slots=slots,
                slot=slot,
                batch_size=batch,
            )
            assert plan.skip == 0 and plan.count == len(positions(plan)) and plan.count % batch == 0
            got.append(positions(plan))
    flat = [p for g in got for p in g]
    assert len(flat) == len(set(flat))  # disjoint
    per_rank_batches = (n // world) // batch  # 5 batches of 3 per rank
    assert len(flat) == world * per_rank_batches * batch  # everything but the tail
    assert sum(len(g) for g in got[:2]) == sum(len(g) for g in got[2:])  # ranks stay in step
    # evaluation plan (no batch size): every sample exactly once
    ev = [
        positions(
            S.plan_slot(lengths, seed=0, epoch=4, shuffle=True, rank=0, world=1, slots=2, slot=s)
        )
        for s in range(2)
    ]
    assert sorted(ev[0] + ev[1]) == list(range(n))


def test_shard_order_is_seeded_by_seed_and_epoch():
    a = S.shard_order(50, 0, 1, True)
    assert a == S.shard_order(50, 0, 1, True) and sorted(a) == list(range(50))
    assert a != S.shard_order(50, 0, 2, True) and a != S.shard_order(50, 1, 1, True)
    assert S.shard_order(50, 0, 1, False) == list(range(50))


# ------------------------------------------------------------------------ streams
@pytest.fixture
def keyed(tmp_path) -> S.ShardSplit:
    return _write_keyed_shards(tmp_path / "shards", [13, 9, 11, 7, 10])  # 50 samples


def test_stream_ranks_and_workers_read_disjoint_parts(keyed, monkeypatch):
    stream = _id_stream(keyed, shuffle=True, shuffle_buffer=8)
    batch, world, workers = 4, 2, 2
    seen: dict[int, tuple] = {}
    for rank in range(world):
        loader = stream.make_loader(batch, 0, 3, rank=rank, world=world, num_workers=workers)
        total = 0
        for w in range(workers):
            ids = _worker_outputs(loader.dataset, w, workers, monkeypatch)
            total += len(ids)
            for i in ids:
                assert i not in seen, f"sample {i} read by {seen[i]} and {(rank, w)}"
                seen[i] = (rank, w)
        assert total == len(loader.dataset) == (50 // world) // batch * batch  # 24 per rank
    assert len(seen) == 48 and set(seen) <= set(range(50))
    # shuffling is deterministic by (seed, epoch): same plan twice, another epoch differs
    again = _rank_batches(stream, batch, 3, 0, world, workers, monkeypatch)[0]
    assert again == _rank_batches(stream, batch, 3, 0, world, workers, monkeypatch)[0]
    assert again != _rank_batches(stream, batch, 4, 0, world, workers, monkeypatch)[0]


def test_stream_without_loader_covers_split_once(keyed, monkeypatch):
    stream = _id_stream(keyed, shuffle=False)
    ids = [i for w in range(2) for i in _worker_outputs(stream, w, 2, monkeypatch)]
    assert sorted(ids) == list(range(50))
    assert [int(b.images) for b in stream] == list(range(50))  # main process: natural order


@pytest.mark.filterwarnings("ignore:This DataLoader will create")
@pytest.mark.parametrize("workers", [0, 2, 3])
@pytest.mark.parametrize("start_batch", [1, 4, 5])
def test_stream_resume_mid_epoch_continues_the_same_batches(
    keyed, monkeypatch, workers, start_batch
):
    stream = _id_stream(keyed, shuffle=True, shuffle_buffer=6)
    batch, world, rank = 4, 2, 1
    full, n_full = _rank_batches(stream, batch, 2, rank, world, workers, monkeypatch)
    assert len(full) == 6 and n_full == 24
    rest, n_rest = _rank_batches(
        stream, batch, 2, rank, world, workers, monkeypatch, start=start_batch * batch * world
    )
    assert rest == full[start_batch:] and n_rest == (6 - start_batch) * batch


def test_real_dataloader_collects_batches_in_planned_order(keyed, monkeypatch):
    stream = _id_stream(keyed, shuffle=True, shuffle_buffer=6)
    # 6 batches per rank, resumed at batch 1: the 2 workers make 3 and 2 batches
    planned, _ = _rank_batches(stream, 4, 1, 0, 2, 2, monkeypatch, start=1 * 4 * 2)
    loader = stream.make_loader(4, 0, 1, start=1 * 4 * 2, rank=0, world=2, num_workers=2)
    real = [b.images.tolist() for b in loader]
    assert real == planned and len(real) == 5


def test_stream_replaces_unreadable_samples_and_counts_them(tmp_path):
    root = tmp_path / "bad"
    root.mkdir()
    with wds.TarWriter(str(root / "train-000000.tar"), encoder=False, mtime=0) as w:
        for k in range(6):
            buf = io.BytesIO()
            Image.new("RGB", (4, 4), (40 * k, 0, 0)).save(buf, format="PNG")
            data = b"not a png" if k in (0, 3) else buf.getvalue()
            w.write({"__key__": f"{k:08d}", "png": data, "cls": str(k).encode()})
    split = S.find_shard_split(root, "train")
    assert split.lengths == [6]  # counted from the tar headers (no index)
    ident = lambda img, epoch, index: img  # noqa: E731
    out = list(S.ShardStream(split, ShardDecoder(3), ident, shuffle=False))
    assert len(out) == 6 and [b.skipped for b in out] == [1, 0, 0, 1, 0, 0]
    assert [b.labels for b in out] == [1, 1, 2, 2, 4, 5]  # the substitute's label
    assert [b.index for b in out] == list(range(6))  # the position in the split
    assert int(out[0][0][0, 0, 0]) == 40 and int(out[3][0][0, 0, 0]) == 80
    with pytest.raises(BadImageError, match="data.on_bad=skip"):
        list(S.ShardStream(split, ShardDecoder(3, on_bad="error"), ident, shuffle=False))


def test_stream_reports_index_that_overstates_a_shard(keyed):
    wrong = S.ShardSplit("train", keyed.files[:1], [14], keyed.classes)  # the file has 13
    with pytest.raises(DataError, match="has 13 samples, the index says 14"):
        list(_id_stream(wrong, shuffle=False, error=DataError))


# ------------------------------------------------------------------------ writing
def test_write_folder_shards_keeps_labels_and_is_deterministic(tmp_path):
    src = make_imagefolder(tmp_path / "src", classes=3, per_class=5, size=8)
    a = write_folder_shards(src, tmp_path / "a", 4, progress=False)
    write_folder_shards(src, tmp_path / "b", 4, progress=False)
    assert a["train"] == {"images": 15, "shards": 4} and a["test"]["images"] == 15
    digest = {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted((tmp_path / "a").glob("*.tar"))
    }
    assert digest == {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted((tmp_path / "b").glob("*.tar"))
    }
    info = json.loads((tmp_path / "a" / S.INFO_FILE).read_text())
    assert info["classes"] == ["class0", "class1", "class2"]
    assert info["splits"]["train"]["shard_lengths"] == [4, 4, 4, 3]
    # every image and its label survive, byte for byte
    folder = scan_source(DataConfig(path=str(src)), "train", labelled=True)
    want = sorted((f.read_bytes(), y) for f, y in zip(folder.items, folder.labels))
    got = []
    for f in info["splits"]["train"]["filenames"]:
        for s in wds.tariterators.tarfile_samples([{"url": str(tmp_path / "a" / f)}]):
            got.append((s["png"], int(s["cls"])))
    assert sorted(got) == want
    assert [y for _, y in got] != sorted(y for _, y in got)  # written shuffled, not by class
    with pytest.raises(DataError, match="already holds shards"):
        write_folder_shards(src, tmp_path / "a", 4, progress=False)


def test_write_limit_picks_the_data_limit_subset(tmp_path):
    src = make_imagefolder(tmp_path / "src", classes=2, per_class=10, size=8, splits=("train",))
    write_folder_shards(src, tmp_path / "o", 3, limit=7, seed=5, order="sorted", progress=False)
    folder = scan_source(DataConfig(path=str(src)), "train", labelled=True)
    pick = subset_indices(folder.labels, 7, "random", 5)
    ds = build_dataset(
        DataConfig(path=str(tmp_path / "o")), "train", 8, 3, 0, train_aug=False, labelled=True
    )
    got = [b.images for b in ds]
    want = [load_image(folder.items[i], 3) for i in pick]
    assert (
        len(got) == 7
        and "test" not in json.loads((tmp_path / "o" / S.INFO_FILE).read_text())["splits"]
    )
    mean, std = torch.tensor(ds.mean).view(3, 1, 1), torch.tensor(ds.std).view(3, 1, 1)
    for g, w in zip(got, want):  # same images, same (sorted) order, eval transform undone
        assert torch.allclose(g * std + mean, w.float() / 255, atol=1e-5)


def test_stats_of_shards_equal_the_folders(tmp_path):
    from mimlab.data.datasets import compute_mean_std

    src = make_imagefolder(tmp_path / "src", classes=2, per_class=6, size=8, splits=("train",))
    write_folder_shards(src, tmp_path / "sh", 5, progress=False)
    got = compute_mean_std(DataConfig(path=str(tmp_path / "sh")), 3, 8)
    assert got == compute_mean_std(DataConfig(path=str(src)), 3, 8)
    assert got[0] != [0.5, 0.5, 0.5]


def test_cli_shards_then_pretrain_and_finetune(tmp_path):
    from mimlab import tasks
    from mimlab.cli import run
    from mimlab.core.config import FinetuneConfig, PretrainConfig, resolve

    src = make_imagefolder(tmp_path / "src", classes=3, per_class=12, size=16)
    assert (
        run(["shards", str(src), str(tmp_path / "sh"), "--shard-size", "10", "--no-progress"]) == 0
    )
    assert detect_kind(tmp_path / "sh") == "wds"
    common = [
        "model.preset=micro",
        f"data.path={tmp_path / 'sh'}",
        "optim.batch_size=8",
        "optim.epochs=1",
        "run.progress=false",
        f"run.out_dir={tmp_path / 'runs'}",
        "data.num_workers=0",
        "model.img_size=16",
    ]
    res = tasks.pretrain(resolve(PretrainConfig, overrides=[*common, "run.name=p"]))
    assert res["steps"] == 36 // 8 and np.isfinite(res["final_loss"])
    ft = tasks.finetune(resolve(FinetuneConfig, overrides=[*common, "run.name=f"]))
    assert ft["val_images"] == 36 and ft["top1"] is not None
    with pytest.raises(DataError, match="data.holdout.*not available for tar shards"):
        build_dataset(
            DataConfig(path=str(tmp_path / "sh"), holdout=0.1),
            "train",
            16,
            3,
            0,
            train_aug=True,
            labelled=True,
        )


@pytest.mark.parametrize("workers", [0, 2])
def test_pretrain_on_shards_resumes_mid_epoch_exactly(tmp_path, workers):
    from mimlab import tasks
    from mimlab.core.config import PretrainConfig, resolve

    src = make_imagefolder(tmp_path / "src", classes=3, per_class=16, size=16, splits=("train",))
    write_folder_shards(src, tmp_path / "sh", 10, progress=False)

    def cfg(name, *extra):
        return resolve(
            PretrainConfig,
            overrides=[
                "model.preset=micro",
                "model.img_size=16",
                f"data.path={tmp_path / 'sh'}",
                "optim.batch_size=8",
                "optim.epochs=2",
                "optim.warmup_epochs=0.5",
                "run.log_every=1",
                "run.progress=false",
                f"run.out_dir={tmp_path}",
                f"run.name={name}",
                f"data.num_workers={workers}",
                "data.shuffle_buffer=16",
                *extra,
            ],
        )

    def losses(name):
        rows = [json.loads(r) for r in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        return [(r["step"], r["loss"]) for r in rows if r["kind"] == "train"]

    tasks.pretrain(cfg("full"))
    tasks.pretrain(cfg("split", "run.stop_at_step=4"))  # 6 steps per epoch: mid-epoch
    assert [s for s, _ in losses("split")] == [1, 2, 3, 4]
    tasks.pretrain(cfg("split", "run.resume=auto"))
    a, b = losses("full"), losses("split")
    assert [s for s, _ in a] == [s for s, _ in b] == list(range(1, 13))
    assert max(abs(x - y) for (_, x), (_, y) in zip(a, b)) <= 1e-6


def test_timm_reads_the_written_shards(tmp_path):
    timm_data = pytest.importorskip("timm.data")
    src = make_imagefolder(tmp_path / "src", classes=3, per_class=4, size=8, splits=("train",))
    write_folder_shards(src, tmp_path / "sh", 5, progress=False)
    ds = timm_data.create_dataset(
        "wds/x", root=str(tmp_path / "sh"), split="train", is_training=False, batch_size=1
    )
    labels = sorted(int(y) for _, y in ds)
    assert labels == sorted(scan_source(DataConfig(path=str(src)), "train", True).labels)


# ------------------------------------------------------------------------ Hugging Face
def _hf_dataset(n_train=9, n_test=4):
    datasets = pytest.importorskip(
        "datasets",
        reason="data.kind=hf needs the optional datasets package (pip install 'mimlab[data]')",
    )
    rows = []
    for i in range(n_train + n_test):
        buf = io.BytesIO()
        Image.fromarray(np.full((8, 8, 3), 20 * i, np.uint8)).save(buf, format="PNG")
        rows.append({"bytes": buf.getvalue(), "path": None})
    feats = datasets.Features(
        {"img": datasets.Image(), "fine": datasets.ClassLabel(names=["x", "y", "z"])}
    )
    labels = [i % 3 for i in range(n_train + n_test)]
    d = datasets.Dataset.from_dict({"img": rows, "fine": labels}, features=feats)
    return datasets, datasets.DatasetDict(
        {"train": d.select(range(n_train)), "validation": d.select(range(n_train, len(d)))}
    )


@pytest.mark.parametrize("layout", ["save_to_disk", "parquet"])
def test_hf_dataset_on_disk(tmp_path, layout, monkeypatch):
    datasets, dd = _hf_dataset()
    root = tmp_path / "hf"
    if layout == "save_to_disk":
        dd.save_to_disk(str(root))
    else:
        (root / "data").mkdir(parents=True)
        for name, d in dd.items():
            d.to_parquet(str(root / "data" / f"{name}-00000-of-00001.parquet"))
        monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "cache"))
    assert detect_kind(root) == "hf"
    cfg = DataConfig(path=str(root))
    train = build_dataset(cfg, "train", 8, 3, 0, train_aug=False, labelled=True)
    val = build_dataset(cfg, "val", 8, 3, 0, train_aug=False, labelled=True)  # test -> validation
    assert len(train) == 9 and len(val) == 4 and train.classes == ["x", "y", "z"]
    assert [train[i][1] for i in range(len(train))] == [i % 3 for i in range(9)]
    raw = build_dataset(
        cfg, "train", 8, 3, 0, train_aug=False, labelled=True, mean=[0.0] * 3, std=[1.0] * 3
    )
    assert [round(float(raw[i][0][0, 0, 0]) * 255) for i in range(9)] == [20 * i for i in range(9)]
    sub = build_dataset(
        DataConfig(path=str(root), limit=3, subset="one_per_class"),
        "train",
        8,
        3,
        0,
        train_aug=True,
        labelled=True,
    )  # random access: subsets work
    assert sorted(sub[i][1] for i in range(len(sub))) == [0, 1, 2]
    with pytest.raises(DataError, match="no image column 'pixels'"):
        build_dataset(
            DataConfig(path=str(root), image_key="pixels"),
            "train",
            8,
            3,
            0,
            train_aug=False,
            labelled=False,
        )


@pytest.mark.slow
def test_bench_shards_case_runs(tmp_path, capsys):
    bench_dir = Path(__file__).resolve().parents[1] / "benchmarks"
    sys.path.insert(0, str(bench_dir))
    try:
        import bench_data
    finally:
        sys.path.remove(str(bench_dir))
    src = make_imagefolder(tmp_path / "src", classes=2, per_class=20, size=8, splits=("train",))
    args = SimpleNamespace(
        preset_cifar="micro",
        batch_cifar=8,
        shard_images=32,
        shard_size=10,
        shard_reps=2,
        workers=[0],
    )
    rows = bench_data.run_shards(str(src), args)
    assert len(rows) == 2 and all(r["images"] == 32 and r["ratio"] > 0 for r in rows)
    assert "shards/folder with 0 worker(s): median" in capsys.readouterr().out
