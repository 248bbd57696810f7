"""Data-pipeline benchmark: can mimlab's DataLoader keep training fed?

For each case (dataset + matching model preset) it measures, in one run:

* **data rate**: images/s delivered by mimlab's training DataLoader (``engine.make_loader``:
  seeded epoch sampler, full batches, ``--workers`` forked worker processes) over mimlab's
  training dataset (``data.build_dataset``: file read + JPEG decode + RandomResizedCrop
  (bicubic, scale 0.2-1) + flip + normalise) plus the method's patch mask for every sample
  (random 75 % for MAE; ``--method simmim`` gives block masks), with training idle;
  the steady rate is timed over whole rounds of ``workers`` batches after the first quarter
  of ``--batches`` (worker start-up is reported apart);
* **train rate**: images/s of full mimlab MAE training steps (forward, backward, AdamW) of the
  matching preset on random tensors, the same function as ``bench_train.py``, median of
  ``--reps``;
* **data / train**: below 1 the workers cannot deliver what training consumes even when they
  have cores of their own, so training would wait on data. ``cores for data`` = the CPU cores
  the pipeline needs to keep up with training (train rate x workers / data rate): on a machine
  where workers and training share the cores this is taken from training;
* **fed rate** (``--fed-steps``, 0 = off): images/s of training steps fed by that DataLoader
  exactly as the engine runs them (masks made in the step), workers and training sharing this
  machine's cores, and fed / train.

Cases: ``cifar``: the CIFAR-10 JPEG copy (32x32 files, train split; ``--cifar``) at the 32 px
preset (tiny, batch 128). ``folder``: a 224 px image folder; without ``--folder DIR`` one is
generated in a temporary directory: ``--folder-images`` random crops (50-100 % of the short
side, aspect 3:4 to 4:3, random flip) of the five natural photos bundled with scikit-image,
resized to a ``--folder-side`` (256) px short side and saved as JPEG quality 90 -- roughly
ImageNet after the usual resize to 256 (full-size ImageNet JPEGs average ~400x350 px and decode
slower); trained at the 224 px preset (vit_b16, batch 16).

``shards`` (opt-in): tar shards against the image folder they were written from, in one run.
A seeded ``--shard-images`` subset of the CIFAR-10 training split is written as WebDataset
shards (``mimlab shards --limit N --splits train``) into a temporary folder under /tmp; the
folder loader (``data.limit`` picks the same images) and the shard stream (``data.kind=wds``)
then deliver one epoch each with the same transform (decode + RandomResizedCrop + flip +
normalise, no mask), batch and workers, alternately ``--shard-reps`` times, so that load from
other jobs on a shared machine hits both alike; images/s of each pass and the shards / folder
ratio per pair (steady rate after start-up, and overall with start-up, which for shards includes
filling the shuffle buffer). The load average before and after is printed.

    python benchmarks/bench_data.py                         # cifar and folder, 2 workers
    python benchmarks/bench_data.py --cases cifar --workers 0,1,2 --json out.jsonl
    python benchmarks/bench_data.py --cases shards --shard-images 10000 --shard-reps 3
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_train as bt  # noqa: E402  (benchmarks/ is not a package)

from mimlab.core.config import DataConfig, PretrainConfig, resolve  # noqa: E402
from mimlab.data.datasets import (  # noqa: E402
    IMG_EXTS,
    PHOTO_NAMES,
    build_dataset,
    default_data_path,
    write_folder_shards,
)
from mimlab.nn.ops import block_masking, random_masking  # noqa: E402
from mimlab.train.engine import make_loader  # noqa: E402

SHARED_CIFAR = "/work/shared/data/cifar10"


class WithMask(Dataset):
    """mimlab's training dataset plus the method's patch mask of every sample: the whole per-image
    CPU work of a masked-image-modeling input pipeline (mimlab itself makes the masks inside the
    training step, where their cost is part of the train rate)."""

    def __init__(self, ds, grid: tuple[int, int], ratio: float, kind: str):
        self.ds, self.grid, self.ratio, self.kind = ds, grid, ratio, kind

    def __len__(self) -> int:
        return len(self.ds)

    def mask(self) -> torch.Tensor:
        n = self.grid[0] * self.grid[1]
        if self.kind == "random":
            return random_masking(torch.rand(1, n), self.ratio)[1][0]
        if self.kind == "block":
            return block_masking(1, self.grid, self.ratio)[0]
        return torch.zeros(n)

    def __getitem__(self, key):
        return self.ds[key], self.mask()  # the item (a mimlab.data.batch.Batch) and its patch mask


def make_photo_folder(root: Path, n: int, side: int, seed: int = 0) -> Path:
    """``root/train/photos/*.jpg``: ``n`` random crops of scikit-image's bundled photos, short side
    ``side`` px, JPEG quality 90 (see the module docstring)."""
    import skimage.data as skd
    from PIL import Image

    rng = np.random.default_rng(seed)
    photos = []
    for name in PHOTO_NAMES:
        a = getattr(skd, name)()
        photos.append(np.repeat(a[..., None], 3, 2) if a.ndim == 2 else a[..., :3])
    out = root / "train" / "photos"  # one-class ImageFolder, like a CIFAR/ImageNet copy
    out.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        a = photos[i % len(photos)]
        H, W = a.shape[:2]
        s = rng.uniform(0.5, 1.0) * min(H, W)
        ar = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
        h, w = int(min(H, s / math.sqrt(ar))), int(min(W, s * math.sqrt(ar)))
        top, left = int(rng.integers(0, H - h + 1)), int(rng.integers(0, W - w + 1))
        im = Image.fromarray(np.ascontiguousarray(a[top : top + h, left : left + w]))
        if rng.random() < 0.5:
            im = im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        k = side / min(h, w)
        im = im.resize((max(side, round(w * k)), max(side, round(h * k))), Image.BICUBIC)
        im.save(out / f"{i:05d}.jpg", quality=90)
    return root


def describe_files(files: list, sample: int = 200) -> dict:
    """Number of files, mean size (KiB) and the most common resolution of a sample of them."""
    from PIL import Image

    files = [Path(f) for f in files]
    pick = files[:: max(1, len(files) // sample)][:sample]
    sizes, res = [], {}
    for f in pick:
        sizes.append(f.stat().st_size / 1024)
        if f.suffix.lower() != ".npy":
            with Image.open(f) as im:
                res[im.size] = res.get(im.size, 0) + 1
    common = max(res, key=res.get) if res else None
    return {
        "files": len(files),
        "mean_file_kib": round(float(np.mean(sizes)), 1) if sizes else 0,
        "typical_px": f"{common[0]}x{common[1]}" if common else "?",
    }


def data_rate(ds, batch: int, workers: int, batches: int, seed: int = 0) -> dict:
    """Images/s of the training DataLoader with nothing consuming but the timer."""
    n = min(batches, len(ds) // batch)
    if n < 1:
        raise SystemExit(f"bench_data: {len(ds)} images is less than one batch of {batch}")
    loader = make_loader(ds, batch, seed, epoch=0, num_workers=workers)
    arrivals = []
    t0 = time.perf_counter()
    it = iter(loader)
    for _ in range(n):
        next(it)
        arrivals.append(time.perf_counter() - t0)
    del it, loader  # shuts the workers down
    # the workers deliver in rounds of `workers` batches made in parallel: time whole rounds,
    # from the end of the first quarter of them (at least the first round: start-up) on
    w = max(1, workers)
    rounds = n // w
    if rounds >= 2:
        k0 = max(1, rounds // 4) * w - 1
        last = rounds * w - 1
        steady = (last - k0) * batch / (arrivals[last] - arrivals[k0])
    else:  # too few batches for a steady rate: the overall one, start-up included
        steady = n * batch / arrivals[-1]
    return {
        "data_img_s": steady,
        "data_startup_s": arrivals[0],
        "data_overall_img_s": n * batch / arrivals[-1],
        "batches": n,
    }


def fed_rate(method, ds, batch: int, workers: int, steps: int, seed: int = 0) -> dict:
    """Images/s of training steps fed by the DataLoader as the engine runs them. Warm-up: at
    least one step, up to the prefetch depth (2 x workers batches) + 1 within 10 s, so that the
    batches the workers prefetched during start-up are consumed before the timing starts."""
    opt = torch.optim.AdamW(method.parameters(), lr=1e-4, betas=(0.9, 0.95), foreach=True)
    warm_max = 2 * workers + 1
    avail = len(ds) // batch
    steps = min(steps, avail - 1)
    if steps < 1:
        return {"fed_img_s": None, "fed_steps": 0}
    loader = make_loader(ds, batch, seed, epoch=1, num_workers=workers)
    it = iter(loader)

    def one():
        x = next(it).images
        opt.zero_grad(set_to_none=True)
        method(x)["loss"].backward()
        opt.step()

    t = time.perf_counter()
    warm = 0
    while warm < 1 or (warm < warm_max and time.perf_counter() - t < 10 and warm + steps < avail):
        one()
        warm += 1
    t = time.perf_counter()
    for _ in range(steps):
        one()
    el = time.perf_counter() - t
    del loader  # the closure keeps `it`; the workers stop when `one` goes
    return {"fed_img_s": steps * batch / el, "fed_steps": steps, "fed_warmup_steps": warm}


def mask_cost_us(wm: WithMask, n: int = 200) -> float:
    wm.mask()
    t = time.perf_counter()
    for _ in range(n):
        wm.mask()
    return (time.perf_counter() - t) / n * 1e6


def run_case(case: str, path: str, desc: dict, preset: str, batch: int, args) -> list[dict]:
    ov = [f"data.path={path}", f"method.name={args.method}"]
    cfg = resolve(PretrainConfig, overrides=[f"model.preset={preset}", *ov])
    m = cfg.model
    ds = build_dataset(
        cfg.data, "train", m.img_size, m.in_chans, cfg.run.seed, train_aug=True, labelled=False
    )
    grid = (m.img_size // m.patch_size, m.img_size // m.patch_size)
    mkind = cfg.method.mask
    wm = WithMask(ds, grid, cfg.method.mask_ratio, mkind)
    mask_us = mask_cost_us(wm)
    step, method, _ = bt.mimlab_mae_step(preset, batch, ov)
    t = bt.time_pair({"mimlab": step}, args.reps)["mimlab"]
    train = batch / t
    out = []
    for nw in args.workers:
        r = {
            "bench": "data",
            "case": case,
            "dataset": desc["name"],
            "path": path,
            "source": desc["source"],
            **{k: desc[k] for k in ("files", "mean_file_kib", "typical_px")},
            "img_size": m.img_size,
            "workers": nw,
            "batch": batch,
            "mask": f"{mkind} {cfg.method.mask_ratio:g}" if mkind != "none" else "none",
            "mask_us_per_image": mask_us,
            "method": args.method,
            "train_preset": preset,
            "train_batch": batch,
            "train_reps": args.reps,
            "threads": torch.get_num_threads(),
            "cpu_count": os.cpu_count(),
            "train_img_s": train,
        }
        r.update(data_rate(wm, batch, nw, args.batches))
        r["ratio"] = r["data_img_s"] / train
        r["training_waits"] = bool(r["ratio"] < 1)
        r["cores_for_data"] = train * max(1, min(nw, os.cpu_count() or 1)) / r["data_img_s"]
        if args.fed_steps > 0:
            r.update(fed_rate(method, ds, batch, nw, args.fed_steps))
            r["fed_over_train"] = r["fed_img_s"] / train if r.get("fed_img_s") else None
        out.append(r)
        print_result(r)
    return out


def run_shards(path: str, args) -> list[dict]:
    """Shards against the folder they came from, alternately (see the module docstring)."""
    cfg = resolve(PretrainConfig, overrides=[f"model.preset={args.preset_cifar}"])
    size, chans, batch = cfg.model.img_size, cfg.model.in_chans, args.batch_cifar
    tmp = Path(tempfile.mkdtemp(prefix="mimlab-bench-shards-", dir="/tmp"))
    out = []
    try:
        t = time.perf_counter()
        info = write_folder_shards(
            path,
            tmp / "shards",
            args.shard_size,
            limit=args.shard_images,
            seed=0,
            progress=False,
            splits=("train",),
        )
        write_s = time.perf_counter() - t
        mib = sum(f.stat().st_size for f in (tmp / "shards").glob("*.tar")) / 2**20
        print(
            f"# shards: {info['train']['images']} images in {info['train']['shards']} shards "
            f"({mib:.1f} MiB) written in {write_s:.1f} s to {tmp / 'shards'}",
            flush=True,
        )
        # the same images and the same train transform for both
        folder = build_dataset(
            DataConfig(path=path, limit=args.shard_images, subset_seed=0),
            "train",
            size,
            chans,
            0,
            train_aug=True,
            labelled=False,
        )
        shards = build_dataset(
            DataConfig(path=str(tmp / "shards")),
            "train",
            size,
            chans,
            0,
            train_aug=True,
            labelled=False,
            mean=folder.mean,
            std=folder.std,
        )
        assert len(folder) == len(shards), (len(folder), len(shards))
        batches = len(folder) // batch  # one whole epoch each
        load0 = os.getloadavg()
        for rep in range(args.shard_reps):
            for nw in args.workers:
                r = {
                    "bench": "data_shards",
                    "rep": rep,
                    "workers": nw,
                    "batch": batch,
                    "img_size": size,
                    "images": len(folder),
                    "shard_size": args.shard_size,
                    "shard_mib": round(mib, 1),
                    "shard_write_s": round(write_s, 2),
                    "shuffle_buffer": shards.shuffle_buffer,
                    "cpu_count": os.cpu_count(),
                }
                for name, ds in (("folder", folder), ("shards", shards)):
                    m = data_rate(ds, batch, nw, batches)
                    r[f"{name}_img_s"] = m["data_img_s"]
                    r[f"{name}_overall_img_s"] = m["data_overall_img_s"]
                    r[f"{name}_startup_s"] = m["data_startup_s"]
                r["ratio"] = r["shards_img_s"] / r["folder_img_s"]
                r["ratio_overall"] = r["shards_overall_img_s"] / r["folder_overall_img_s"]
                out.append(r)
                print(
                    f"shards rep {rep} {nw} worker(s) batch {batch}: folder "
                    f"{r['folder_img_s']:7.1f} img/s (overall {r['folder_overall_img_s']:7.1f})"
                    f" | shards {r['shards_img_s']:7.1f} img/s (overall "
                    f"{r['shards_overall_img_s']:7.1f}, start-up {r['shards_startup_s']:.2f} s)"
                    f" | shards/folder {r['ratio']:.2f} (overall {r['ratio_overall']:.2f})",
                    flush=True,
                )
        load1 = os.getloadavg()
        for r in out:
            r["loadavg_before"], r["loadavg_after"] = list(load0), list(load1)
        print(
            f"# load average (1, 5, 15 min) before {load0[0]:.2f} {load0[1]:.2f} "
            f"{load0[2]:.2f}, after {load1[0]:.2f} {load1[1]:.2f} {load1[2]:.2f} on "
            f"{os.cpu_count()} cores",
            flush=True,
        )
        for nw in args.workers:
            rs = sorted(r["ratio"] for r in out if r["workers"] == nw)
            print(
                f"# shards/folder with {nw} worker(s): median {rs[len(rs) // 2]:.2f} "
                f"(range {rs[0]:.2f}-{rs[-1]:.2f}, {len(rs)} pairs)",
                flush=True,
            )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def print_result(r: dict) -> None:
    line = (
        f"{r['case']:6s} {r['img_size']:3d} px, {r['workers']} worker(s), batch "
        f"{r['batch']:3d}: data {r['data_img_s']:8.1f} img/s (decode+augment+{r['mask']} "
        f"mask; start-up {r['data_startup_s']:.2f} s) | train {r['train_preset']}@"
        f"{r['train_batch']} {r['train_img_s']:8.1f} img/s | data/train {r['ratio']:.2f} -> "
    )
    if r["training_waits"]:
        line += "training WOULD wait on data"
    else:
        line += (
            f"training would not wait on data (needs {r['cores_for_data']:.2f} core(s) "
            f"for the pipeline)"
        )
    if r.get("fed_img_s"):
        where = (
            f"workers and training share {r['cpu_count']} cores"
            if r["workers"]
            else "loading in the training process"
        )
        line += f" | fed {r['fed_img_s']:8.1f} img/s = {r['fed_over_train']:.2f} x train ({where})"
    print(line, flush=True)


def main():
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--cases", default="cifar,folder", help="comma list of: cifar, folder, shards (opt-in)"
    )
    ap.add_argument("--workers", default="2", help="DataLoader workers; a comma list runs each")
    ap.add_argument(
        "--cifar",
        default=None,
        help="CIFAR-10 copy (ImageFolder with train/); default ../shared/data/cifar10",
    )
    ap.add_argument(
        "--folder",
        default=None,
        help="your 224 px image folder (with train/ or flat) instead of the generated one",
    )
    ap.add_argument("--folder-images", type=int, default=512, help="generated folder: files")
    ap.add_argument("--folder-side", type=int, default=256, help="generated folder: short side")
    ap.add_argument("--preset-cifar", default="tiny")
    ap.add_argument("--batch-cifar", type=int, default=128)
    ap.add_argument("--preset-folder", default="vit_b16")
    ap.add_argument("--batch-folder", type=int, default=16)
    ap.add_argument(
        "--method", default="mae", help="method preset whose masking is generated (and trained)"
    )
    ap.add_argument("--batches", type=int, default=24, help="data batches timed per case")
    ap.add_argument("--reps", type=int, default=3, help="timed training steps (median)")
    ap.add_argument(
        "--fed-steps",
        type=int,
        default=8,
        help="timed training steps fed by the DataLoader (0 = skip)",
    )
    ap.add_argument(
        "--shard-images",
        type=int,
        default=10000,
        help="shards case: CIFAR-10 training images written and read",
    )
    ap.add_argument("--shard-size", type=int, default=1000, help="shards case: images per shard")
    ap.add_argument(
        "--shard-reps", type=int, default=3, help="shards case: alternating folder/shards passes"
    )
    ap.add_argument("--json", help="append results as JSON lines to this file")
    a = ap.parse_args()
    a.workers = [int(w) for w in str(a.workers).split(",")]
    cases = [c.strip() for c in a.cases.split(",") if c.strip()]
    bad = [c for c in cases if c not in ("cifar", "folder", "shards")]
    if bad:
        ap.error(f"unknown case(s) {bad}; choose from cifar, folder, shards")
    print(
        f"# {platform.processor() or platform.machine()}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, {os.cpu_count()} cores",
        flush=True,
    )
    results = []
    if "cifar" in cases:
        path = a.cifar or default_data_path() or SHARED_CIFAR
        if not (Path(path) / "train").is_dir():
            print(f"cifar: skipped, no CIFAR-10 copy at {path} (use --cifar DIR)")
        else:
            files = sorted(
                p for p in (Path(path) / "train").rglob("*") if p.suffix.lower() in IMG_EXTS
            )
            desc = {
                "name": "CIFAR-10 train",
                "source": f"{path}/train (JPEG files)",
                **describe_files(files),
            }
            results += run_case("cifar", path, desc, a.preset_cifar, a.batch_cifar, a)
    if "folder" in cases:
        tmp = None
        try:
            if a.folder:
                path = a.folder
                source = f"{path} (user folder)"
            else:
                tmp = Path(tempfile.mkdtemp(prefix="mimlab-bench-data-"))
                t = time.perf_counter()
                make_photo_folder(tmp, a.folder_images, a.folder_side)
                path = str(tmp)
                source = (
                    f"{a.folder_images} random crops of scikit-image's photos, "
                    f"{a.folder_side} px short side, JPEG q90 "
                    f"({time.perf_counter() - t:.1f} s to write)"
                )
            root = Path(path) / "train" if (Path(path) / "train").is_dir() else Path(path)
            files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMG_EXTS)
            desc = {
                "name": "user image folder" if a.folder else "generated photo folder",
                "source": source,
                **describe_files(files),
            }
            results += run_case("folder", path, desc, a.preset_folder, a.batch_folder, a)
        finally:
            if tmp is not None:
                shutil.rmtree(tmp, ignore_errors=True)
    if "shards" in cases:
        path = a.cifar or default_data_path() or SHARED_CIFAR
        if not (Path(path) / "train").is_dir():
            print(f"shards: skipped, no CIFAR-10 copy at {path} (use --cifar DIR)")
        else:
            results += run_shards(path, a)
    if a.json:
        with open(a.json, "a") as f:
            for r in results:
                f.write(json.dumps(r) + "\n")
    results_dt = [r for r in results if r["bench"] == "data"]
    if results_dt:
        worst = min(results_dt, key=lambda r: r["ratio"])
        verdict = "data-bound" if worst["training_waits"] else "not data-bound"
        print(
            f"# lowest data/train: {worst['case']} with {worst['workers']} worker(s): "
            f"{worst['ratio']:.2f} ({verdict})"
        )


if __name__ == "__main__":
    main()
