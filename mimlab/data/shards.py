"""Data at scale: WebDataset tar shards and Hugging Face ``datasets`` on disk.

The storage layer under :mod:`mimlab.data.datasets` (which decodes, augments and chooses the kind);
it imports nothing from mimlab. Reading and writing tars goes through the ``webdataset`` package,
Hugging Face datasets through ``datasets``; both are optional (``pip install 'mimlab[data]'``)
and imported only when used.

**Shards** (``data.kind=wds``): ``.tar`` files in the WebDataset layout, one sample per key
(``{key}.jpg|png|...`` + ``{key}.cls``, the class index as text). ``mimlab shards`` writes them
with an ``_info.json`` index in timm's ``reader_wds`` format (``splits -> {num_samples,
filenames, shard_lengths}``, plus ``classes``), so timm reads them too; without an index the
samples of each shard are counted from the tar headers.

**The epoch plan** (:func:`plan_slot`, pure): the shards are put in a seeded order per
(seed, epoch) and concatenated into one sequence of N samples. Rank ``r`` of ``world`` owns
positions ``[r * N_r, r * N_r + M * B)`` (``N_r = N // world``, ``M = N_r // B`` batches of
``B``; the tail is dropped, as :class:`mimlab.data.datasets.EpochSampler` drops it). Its ``W``
DataLoader workers ("slots") split that range into contiguous segments: slot ``o`` makes the rank's
batches ``k = o, o + W, ...``, which is the order in which a DataLoader collects batches from
its workers, so the rank's batch sequence is fixed by (seed, epoch, world, W, B). Every rank and
worker reads a disjoint part of the epoch and together they read all of it but the tail. Each
slot streams its segment through a shuffle buffer seeded by (seed, epoch, rank, slot) of
undecoded samples, then decodes and augments (augmentation seeded by the sample's index in the
split, as for image folders).

**Resume**: the slot streams are deterministic, so a loader that starts at batch ``m`` of the
epoch replays each slot's stream without decoding, drops the samples of batches ``< m`` and
re-assigns slots to workers so that batch ``m`` comes first: an exact mid-epoch resume when the
number of processes, ``data.num_workers`` and ``optim.batch_size`` are unchanged. When they
change, the run continues at the same step with the remaining batches of the new plan: the
count of samples per epoch is right, but some samples of that epoch may be seen twice or not at
all.

**Hugging Face** (``data.kind=hf``): a ``save_to_disk`` folder, parquet files, or any local folder
``datasets.load_dataset`` understands (e.g. ``imagefolder``); random access, so it uses the
same sampler, subsets and exact resume as image folders.
"""

from __future__ import annotations

import copy
import itertools
import json
import logging
import random
import re
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from tqdm.auto import tqdm

from .batch import Batch

log = logging.getLogger("mimlab.shards")

INFO_FILE = "_info.json"
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff", "ppm", "pgm", "npy")
HF_SPLIT_ALIASES = {
    "test": ("test", "validation", "valid", "val"),
    "val": ("validation", "val", "valid", "test"),
    "validation": ("validation", "val", "valid", "test"),
}


class ShardError(RuntimeError):
    """Shards or a Hugging Face dataset on disk cannot be used (the message says what to do)."""


def _wds():
    try:
        import webdataset  # lazy: optional dependency (data.kind=wds, `mimlab shards`)
    except ImportError:
        raise ShardError(
            "tar shards need the webdataset package: pip install 'mimlab[data]' "
            "(or pip install webdataset)"
        ) from None
    return webdataset


def _hf():
    try:
        import datasets  # lazy: optional heavy dependency (pyarrow); only data.kind=hf needs it
    except ImportError:
        raise ShardError(
            "data.kind=hf needs the datasets package: pip install 'mimlab[data]' "
            "(or pip install datasets)"
        ) from None
    return datasets


def _seed(*ints: int) -> int:
    """A 32-bit seed derived from integers (numpy SeedSequence)."""
    return int(np.random.SeedSequence([int(i) & 0xFFFFFFFF for i in ints]).generate_state(1)[0])


# ------------------------------------------------------------------------------ shard sets
@dataclass
class ShardSplit:
    """One split's shards in their natural order, samples per shard, and class names."""

    name: str
    files: list[str]
    lengths: list[int]
    classes: list[str] = field(default_factory=list)

    @property
    def num_samples(self) -> int:
        return int(sum(self.lengths))

    @property
    def offsets(self) -> list[int]:
        """Index in the split of each shard's first sample."""
        return [0, *itertools.accumulate(self.lengths)][:-1]

    def head(self, n: int) -> "ShardSplit":
        """The first ``n`` samples (whole shards, the last one cut)."""
        lengths, left = [], n
        for k in self.lengths:
            if left <= 0:
                break
            lengths.append(min(k, left))
            left -= lengths[-1]
        return ShardSplit(self.name, self.files[: len(lengths)], lengths, self.classes)


SPLIT_DIRS = ("train", "test", "val", "validation")


def is_shard_dir(root: Path) -> bool:
    """An ``_info.json`` index, or ``.tar`` files at the top or in a split folder (train/,
    test/, val/, validation/; not every sub-folder: a large ImageFolder stays cheap to probe)."""
    return (
        (root / INFO_FILE).is_file()
        or any(root.glob("*.tar"))
        or any(any((root / d).glob("*.tar")) for d in SPLIT_DIRS if (root / d).is_dir())
    )


def _key_of(name: str) -> Optional[str]:
    """WebDataset grouping: the sample key is the path up to the first dot of the basename."""
    m = re.match(r"^((?:.*/|)[^.]+)[.]([^/]*)$", name)
    return m.group(1) if m else None


def count_tar_samples(path: str | Path) -> int:
    """Samples (runs of consecutive members sharing a key) in one tar, from the headers only."""
    n, last = 0, None
    try:
        with tarfile.open(path, "r") as tf:
            for m in tf:
                if not m.isreg():
                    continue
                key = _key_of(m.name)
                if key is not None and not key.split("/")[-1].startswith("__") and key != last:
                    n, last = n + 1, key
    except (OSError, tarfile.TarError) as e:
        raise ShardError(f"{path}: not a readable tar file ({type(e).__name__}: {e})") from None
    return n


def find_shard_split(root: Path, split: str) -> ShardSplit:
    """The shards of ``split`` under ``root``: from ``_info.json`` (timm's format) when present,
    else ``root/<split>/*.tar``, ``root/<split>-*.tar``, or (``split`` '' or 'train') every
    ``root/*.tar``; sample counts from the index or the tar headers."""
    info_path = root / INFO_FILE
    classes: list[str] = []
    if info_path.is_file():
        try:
            info = json.loads(info_path.read_text())
        except (OSError, ValueError) as e:
            raise ShardError(f"{info_path}: unreadable index ({e}); fix or delete it") from None
        classes = list(info.get("classes") or [])
        splits = info.get("splits") or {}
        name = (
            split
            if split in splits
            else next((a for a in HF_SPLIT_ALIASES.get(split, ()) if a in splits), None)
        )
        if name is None and split == "" and len(splits) == 1:
            name = next(iter(splits))
        if name is None:
            raise ShardError(
                f"{info_path}: no split '{split}' (it has: "
                f"{', '.join(splits) or 'none'}); set data.train_split / "
                "data.val_split"
            )
        s = splits[name]
        files = [str(root / f) for f in s["filenames"]]
        missing = [f for f in files if not Path(f).is_file()]
        if missing:
            raise ShardError(
                f"{info_path}: {len(missing)} shard(s) listed but missing, e.g. {missing[0]}"
            )
        lengths = [int(k) for k in s.get("shard_lengths") or [count_tar_samples(f) for f in files]]
        if len(lengths) != len(files):
            raise ShardError(
                f"{info_path}: split '{name}' lists {len(files)} files but "
                f"{len(lengths)} shard_lengths"
            )
        return ShardSplit(name, files, lengths, classes)
    if split and (root / split).is_dir():
        files = sorted((root / split).glob("*.tar"))
    elif split:
        files = sorted(root.glob(f"{split}-*.tar")) or sorted(root.glob(f"{split}_*.tar"))
        if not files and split == "train":
            files = sorted(root.glob("*.tar"))
    else:
        files = sorted(root.glob("*.tar"))
    if not files:
        raise ShardError(
            f"{root}: no .tar shards for split '{split}' (looked for {INFO_FILE}, "
            f"{split}/*.tar, {split}-*.tar)"
        )
    log.info(
        "%s: no %s, counting the samples of %d shard(s) from their headers",
        root,
        INFO_FILE,
        len(files),
    )
    return ShardSplit(
        split or "train", [str(f) for f in files], [count_tar_samples(f) for f in files], classes
    )


# ------------------------------------------------------------------------------ writing
def write_shards(
    samples: Sequence[tuple[str | Path, int]],
    out_dir: str | Path,
    split: str,
    shard_size: int,
    progress: bool = True,
) -> dict:
    """Write ``(image file, label)`` pairs, in the given order, as ``out_dir/<split>-NNNNNN.tar``
    (WebDataset layout: ``{key}.<ext>`` with the file's bytes unchanged, ``{key}.cls`` when
    label >= 0; keys are the sample's position, 8 digits). Tar headers carry a fixed mtime, so
    the same input gives byte-identical shards. Returns the split's ``_info.json`` entry."""
    if shard_size < 1:
        raise ShardError(f"--shard-size must be >= 1, got {shard_size}")
    wds = _wds()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files, lengths = [], []
    writer = None
    bar = tqdm(
        total=len(samples),
        unit="img",
        desc=f"shards {split}",
        disable=not progress,
        dynamic_ncols=True,
        mininterval=0.5,
    )
    try:
        for i, (path, label) in enumerate(samples):
            if i % shard_size == 0:
                if writer is not None:
                    writer.close()
                name = f"{split}-{len(files):06d}.tar"
                # an int mtime: a float one makes tarfile add a PAX header (+1 KiB) per member
                writer = wds.TarWriter(str(out / name), encoder=False, mtime=0)
                files.append(name)
                lengths.append(0)
            p = Path(path)
            ext = p.suffix.lower().lstrip(".")
            ext = {"jpeg": "jpg", "tif": "tiff"}.get(ext, ext)
            sample = {"__key__": f"{i:08d}", ext: p.read_bytes()}
            if label >= 0:
                sample["cls"] = str(int(label)).encode()
            writer.write(sample)
            lengths[-1] += 1
            bar.update(1)
    finally:
        if writer is not None:
            writer.close()
        bar.close()
    return {
        "name": split,
        "num_samples": len(samples),
        "filenames": files,
        "shard_lengths": lengths,
    }


def write_info(
    out_dir: str | Path,
    splits: dict[str, dict],
    classes: Sequence[str],
    extra: Optional[dict] = None,
) -> Path:
    """``out_dir/_info.json`` in timm's ``reader_wds`` format plus ``classes`` (and ``extra``)."""
    path = Path(out_dir) / INFO_FILE
    info = {"name": Path(out_dir).name, "splits": splits, "classes": list(classes), **(extra or {})}
    path.write_text(json.dumps(info, indent=1) + "\n")
    return path


# ------------------------------------------------------------------------------ epoch plan
@dataclass(frozen=True)
class Piece:
    """Samples ``[start, stop)`` (natural order) of shard ``shard``."""

    shard: int
    start: int
    stop: int


@dataclass(frozen=True)
class SlotPlan:
    """What one (rank, worker) reads in an epoch: ``pieces`` in order, through a shuffle buffer
    seeded with ``stream_seed``; the first ``skip`` samples of that stream are dropped (already
    consumed before a resume) and the next ``count`` are delivered."""

    pieces: tuple[Piece, ...]
    skip: int
    count: int
    stream_seed: int


def shard_order(n_shards: int, seed: int, epoch: int, shuffle: bool) -> list[int]:
    """The epoch's shard order: a permutation seeded by (seed, epoch), or natural order."""
    if not shuffle:
        return list(range(n_shards))
    return np.random.default_rng(_seed(seed, epoch, 0x5EED)).permutation(n_shards).tolist()


def range_pieces(
    lengths: Sequence[int], order: Sequence[int], lo: int, hi: int
) -> tuple[Piece, ...]:
    """Positions ``[lo, hi)`` of the sequence made by concatenating shards in ``order``."""
    out, pos = [], 0
    for s in order:
        a, b = max(lo, pos), min(hi, pos + lengths[s])
        if a < b:
            out.append(Piece(s, a - pos, b - pos))
        pos += lengths[s]
        if pos >= hi:
            break
    return tuple(out)


def plan_slot(
    lengths: Sequence[int],
    *,
    seed: int,
    epoch: int,
    shuffle: bool,
    rank: int,
    world: int,
    slots: int,
    slot: int,
    batch_size: Optional[int] = None,
    start_batch: int = 0,
) -> SlotPlan:
    """The part of epoch ``epoch`` that worker ``slot`` (of ``slots``) of rank ``rank`` (of
    ``world``) reads (see the module docstring).

    With ``batch_size`` B (training): the rank's ``M = (N // world) // B`` batches are dealt to
    slots round-robin, slot o getting batches o, o + W, ... as one contiguous segment of
    ``c_o * B`` samples; ``start_batch`` m skips the rank's first m batches and hands slot
    ``(m + slot) % W``'s segment to worker ``slot``, so that a DataLoader collecting batches
    from its workers in turn yields batches m, m + 1, ... . Without ``batch_size`` (evaluation):
    the rank's range is cut into ``slots`` nearly equal segments, every sample delivered.
    """
    n = int(sum(lengths))
    if not (0 <= rank < world and 0 <= slot < slots):
        raise ShardError(f"bad plan: rank {rank} of {world}, worker {slot} of {slots}")
    per_rank = n // world
    lo_rank = rank * per_rank
    order = shard_order(len(lengths), seed, epoch, shuffle)
    if batch_size is None:
        lo = lo_rank + per_rank * slot // slots
        hi = lo_rank + per_rank * (slot + 1) // slots
        return SlotPlan(
            range_pieces(lengths, order, lo, hi), 0, hi - lo, _seed(seed, epoch, rank, slot)
        )
    m_total = per_rank // batch_size
    counts = [len(range(o, m_total, slots)) for o in range(slots)]
    o = (start_batch + slot) % slots
    lo = lo_rank + batch_size * sum(counts[:o])
    hi = lo + batch_size * counts[o]
    skip = batch_size * len(range(o, min(start_batch, m_total), slots))
    return SlotPlan(
        range_pieces(lengths, order, lo, hi), skip, hi - lo - skip, _seed(seed, epoch, rank, o)
    )


# ------------------------------------------------------------------------------ streaming
@dataclass(frozen=True)
class LoaderPlan:
    """The training-loader settings a :class:`ShardStream` copy plans its epoch with."""

    batch_size: int
    rank: int
    world: int
    slots: int
    start_batch: int


class ShardStream(IterableDataset):
    """Streams one split of tar shards as :class:`mimlab.data.batch.Batch` items (``index``: the
    sample's position in the split, ``skipped``: 1 when an unreadable sample was replaced).

    ``decode(sample, where) -> (uint8 image [C, H, W] or None if unreadable, label)`` and
    ``augment(image, epoch, index) -> tensor`` are supplied by :mod:`mimlab.data.datasets` (robust
    decoding, per-sample seeded transforms); ``error`` is the exception type raised for
    problems with the shards (``datasets.DataError``). An unreadable sample is replaced by
    the last readable one of the same worker (the first readable one when none came before) and
    counted in ``n_skipped``, so every worker delivers exactly its planned number of samples.

    Iterated directly or by a plain DataLoader, the split is cut between the DataLoader's
    workers, every sample once (rank 0 of 1). :meth:`make_loader` gives the training loader of
    one epoch of one rank (see :func:`plan_slot`). ``len()`` is the split's size (or, for a
    loader's copy, what that loader delivers).
    """

    def __init__(
        self,
        split: ShardSplit,
        decode: Callable[[dict, str], tuple],
        augment: Callable[[torch.Tensor, int, int], torch.Tensor],
        *,
        seed: int = 0,
        shuffle: bool = True,
        shuffle_buffer: int = 2048,
        error: type = ShardError,
    ):
        if split.num_samples < 1:
            raise error(f"shard split '{split.name}' has no samples")
        try:
            _wds()  # fail when building, not in a loader worker
        except ShardError as e:
            raise error(str(e)) from None
        self.split, self.decode, self.augment = split, decode, augment
        self.seed, self.shuffle, self.shuffle_buffer = seed, shuffle, max(0, int(shuffle_buffer))
        self.error = error
        self.epoch = 0
        self.plan: Optional[LoaderPlan] = None

    @property
    def classes(self) -> list[str]:
        return self.split.classes

    def __len__(self) -> int:
        if self.plan is None:
            return self.split.num_samples
        p = self.plan
        m_total = (self.split.num_samples // p.world) // p.batch_size
        return max(0, m_total - p.start_batch) * p.batch_size

    def slot_plan(self) -> SlotPlan:
        """This worker's (or the main process's) part of the epoch."""
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        common = dict(seed=self.seed, epoch=self.epoch, shuffle=self.shuffle)
        if self.plan is None:
            return plan_slot(self.split.lengths, rank=0, world=1, slots=nw, slot=wid, **common)
        p = self.plan
        if nw != p.slots:
            raise self.error(f"shard loader planned for {p.slots} worker(s) runs in {nw}")
        return plan_slot(
            self.split.lengths,
            rank=p.rank,
            world=p.world,
            slots=p.slots,
            slot=wid,
            batch_size=p.batch_size,
            start_batch=p.start_batch,
            **common,
        )

    def _read(self, pieces: Sequence[Piece]) -> Iterator[tuple[int, dict]]:
        """(index in the split, undecoded sample) for each piece, via webdataset's tar reader."""
        wds = _wds()
        offsets = self.split.offsets
        for pc in pieces:
            url = self.split.files[pc.shard]
            it = wds.tariterators.tarfile_samples([{"url": url}])
            got = 0
            try:
                for j, sample in enumerate(it):
                    if j >= pc.start:
                        yield offsets[pc.shard] + j, sample
                    got = j + 1
                    if got >= pc.stop:
                        break
            except (OSError, tarfile.TarError, ValueError) as e:
                raise self.error(f"{url}: unreadable shard ({type(e).__name__}: {e})") from None
            finally:
                it.close()
            if got < pc.stop:
                raise self.error(
                    f"{url}: has {got} samples, the index says "
                    f"{self.split.lengths[pc.shard]}; rewrite {INFO_FILE}"
                )

    def raw_stream(self, plan: SlotPlan) -> Iterator[tuple[int, dict]]:
        """The slot's undecoded samples after shuffling and the resume skip."""
        s: Iterator = self._read(plan.pieces)
        if self.shuffle and self.shuffle_buffer > 1:
            # start yielding once a quarter of the buffer is filled (as timm does), then keep
            # it full: a shorter start-up, the same determinism
            s = _wds().filters.shuffle(
                self.shuffle_buffer,
                initial=max(1, self.shuffle_buffer // 4),
                rng=random.Random(plan.stream_seed),
            )(s)
        return itertools.islice(s, plan.skip, plan.skip + plan.count)

    def __iter__(self) -> Iterator[Batch]:
        plan = self.slot_plan()
        last: Optional[tuple[torch.Tensor, int]] = None
        pending: list[int] = []  # indices of unreadable samples before the first good
        for index, sample in self.raw_stream(plan):
            img, label = self.decode(sample, f"{sample.get('__url__')}:{sample.get('__key__')}")
            if img is None:
                if last is None:
                    pending.append(index)
                    continue
                yield Batch(self.augment(last[0], self.epoch, index), last[1], index, 1)
                continue
            last = (img, int(label))
            for k in pending:
                yield Batch(self.augment(img, self.epoch, k), last[1], k, 1)
            pending = []
            yield Batch(self.augment(img, self.epoch, index), last[1], index, 0)
        if pending:
            raise self.error(
                f"all {len(pending)} samples of this worker's part of shard split "
                f"'{self.split.name}' were unreadable"
            )

    def make_loader(
        self,
        batch_size: int,
        seed: int,
        epoch: int,
        start: int = 0,
        rank: int = 0,
        world: int = 1,
        num_workers: int = 0,
        pin_memory: bool = False,
    ) -> DataLoader:
        """Training DataLoader of one epoch for one rank, from global sample ``start`` on (a
        multiple of ``batch_size * world``), the same arguments as ``engine.make_loader``."""
        if start % (batch_size * world):
            raise self.error(
                f"cannot start a shard epoch at sample {start}: not a multiple of "
                f"the global batch {batch_size} x {world}"
            )
        ds = copy.copy(self)
        ds.seed, ds.epoch = seed, epoch
        ds.plan = LoaderPlan(
            batch_size, rank, world, max(1, num_workers), start // (batch_size * world)
        )
        gen = torch.Generator().manual_seed(seed * 1000 + epoch)
        return DataLoader(
            ds,
            batch_size=batch_size,
            drop_last=True,
            num_workers=num_workers,
            pin_memory=pin_memory,
            generator=gen,
            persistent_workers=False,
            multiprocessing_context="fork" if num_workers > 0 else None,
        )


# ------------------------------------------------------------------------------ Hugging Face
def is_hf_dir(root: Path) -> bool:
    """A ``save_to_disk`` folder (``dataset_dict.json`` / ``state.json``) or parquet files."""
    return (
        (root / "dataset_dict.json").is_file()
        or (root / "state.json").is_file()
        or any(root.glob("*.parquet"))
        or any(root.glob("data/*.parquet"))
    )


@dataclass
class HFSplit:
    """One split of a Hugging Face dataset with its image column left undecoded."""

    table: Any  # datasets.Dataset
    image_key: str
    label_key: Optional[str]
    classes: list[str]
    name: str

    def __len__(self) -> int:
        return len(self.table)

    def labels(self) -> list[int]:
        if self.label_key is None:
            return [-1] * len(self.table)
        return [int(v) for v in self.table[self.label_key]]

    def payload(self, i: int) -> tuple[Optional[bytes], Optional[str]]:
        """Row ``i``'s encoded image bytes, or (when only a path is stored) its file path."""
        v = self.table[int(i)][self.image_key]
        return (v.get("bytes"), v.get("path")) if isinstance(v, dict) else (None, None)


def open_hf_split(
    root: str | Path,
    split: str,
    image_key: Optional[str] = None,
    label_key: Optional[str] = None,
    cache_dir: Optional[str] = None,
) -> HFSplit:
    """``split`` of the dataset at ``root``: ``datasets.load_from_disk`` for a ``save_to_disk``
    folder, else ``datasets.load_dataset(root)`` (parquet files, an image folder, ...; built
    into ``cache_dir``, default the datasets cache). Image column: ``image_key`` or the first
    ``Image`` feature; label column: ``label_key``, else the first ``ClassLabel`` feature, else
    'label' / 'labels' if present (class names then '0', '1', ...), else none (label -1)."""
    ds_mod = _hf()
    root = Path(root)
    try:
        if (root / "dataset_dict.json").is_file() or (root / "state.json").is_file():
            d = ds_mod.load_from_disk(str(root))
        else:
            d = ds_mod.load_dataset(str(root), cache_dir=cache_dir)
    except Exception as e:  # noqa: BLE001 - datasets raises many types for unusable folders
        raise ShardError(
            f"{root}: not a Hugging Face dataset ({type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''})"
        ) from None
    if isinstance(d, ds_mod.DatasetDict):
        names = list(d)
        pick = (
            split
            if split in d
            else next((a for a in HF_SPLIT_ALIASES.get(split, ()) if a in d), None)
        )
        if pick is None and not split and len(names) == 1:
            pick = names[0]
        if pick is None:
            raise ShardError(
                f"{root}: no split '{split}' (it has: {', '.join(names)}); set "
                "data.train_split / data.val_split"
            )
        table, name = d[pick], pick
    else:
        table, name = d, split or "train"
    feats = table.features
    if image_key is None:
        image_key = next((k for k, f in feats.items() if isinstance(f, ds_mod.Image)), None)
    if image_key is None or image_key not in feats:
        raise ShardError(
            f"{root}: no image column{f' {image_key!r}' if image_key else ''} "
            f"(columns: {', '.join(feats)}); set data.image_key"
        )
    if not isinstance(feats[image_key], ds_mod.Image):
        raise ShardError(
            f"{root}: column '{image_key}' is {type(feats[image_key]).__name__}, "
            "not an Image feature"
        )
    if label_key is None:
        label_key = next(
            (k for k, f in feats.items() if isinstance(f, ds_mod.ClassLabel)), None
        ) or next((k for k in ("label", "labels") if k in feats), None)
    elif label_key not in feats:
        raise ShardError(f"{root}: no label column '{label_key}' (columns: {', '.join(feats)})")
    # only the two columns, the image left encoded (mimlab decodes it, robustly)
    table = table.select_columns([k for k in (image_key, label_key) if k is not None])
    table = table.cast_column(image_key, ds_mod.Image(decode=False))
    classes: list[str] = []
    if label_key is not None:
        f = feats[label_key]
        if isinstance(f, ds_mod.ClassLabel):
            classes = list(f.names)
        else:
            top = max((int(v) for v in table[label_key]), default=-1)
            classes = [str(i) for i in range(top + 1)]
    return HFSplit(table, image_key, label_key, classes, f"{root.name}:{name}")
