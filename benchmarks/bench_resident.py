"""``data.resident`` against the decoding loader: training batches per second on this machine.

Both feed the same training set (a seeded subset of an image folder, default the shared
CIFAR-10 copy) in the same epoch order at the same batch size; the reference is the decoding
path the engine uses without ``data.resident`` (``make_loader``: per-sample decode,
RandomResizedCrop, flip, normalise in ``--workers`` worker processes), measured in the same run.
The resident path's one-off decode (building the uint8 tensor) is reported separately. One
torch thread in the main process; the load average before and after is printed, since other
jobs on a shared machine lower both rates.

    python benchmarks/bench_resident.py --data ../shared/data/cifar10 --images 5000
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch

from mimlab.core.config import DataConfig
from mimlab.data.datasets import build_dataset
from mimlab.data.resident import resident_dataset
from mimlab.train.engine import make_loader


def _rate(loader_fn, batches: int, batch: int, reps: int) -> float:
    rates = []
    for _ in range(reps):
        it = iter(loader_fn())
        next(it)  # warm-up batch (worker start-up)
        t0 = time.perf_counter()
        for _ in range(batches):
            b = next(it)
            float(b.images[0, 0, 0, 0])  # the batch is really there
        rates.append(batches * batch / (time.perf_counter() - t0))
    return statistics.median(rates)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default="../shared/data/cifar10")
    ap.add_argument("--images", type=int, default=5000)
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--batches", type=int, default=15)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--json", default=None, help="append the result as one JSON line")
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    load0 = os.getloadavg()[0]
    cfg = DataConfig(path=a.data, limit=a.images, num_workers=a.workers)
    base = build_dataset(cfg, "train", a.size, 3, 0, train_aug=True, labelled=False)
    t0 = time.perf_counter()
    res = resident_dataset(base, a.size, cfg.crop_scale, cfg.hflip)
    build_s = time.perf_counter() - t0
    decode = _rate(
        lambda: make_loader(base, a.batch, 0, 0, num_workers=a.workers), a.batches, a.batch, a.reps
    )
    resident = _rate(lambda: res.make_loader(a.batch, 0, 0), a.batches, a.batch, a.reps)
    out = {
        "bench": "resident",
        "images": len(base),
        "size": a.size,
        "batch": a.batch,
        "workers": a.workers,
        "decoding_img_per_s": round(decode, 1),
        "resident_img_per_s": round(resident, 1),
        "ratio": round(resident / decode, 2),
        "resident_build_s": round(build_s, 2),
        "load_before_after": [round(load0, 2), round(os.getloadavg()[0], 2)],
    }
    print(
        f"decoding loader ({a.workers} worker(s)): {decode:,.0f} img/s; resident (CPU, 1 "
        f"thread): {resident:,.0f} img/s = {resident / decode:.2f}x; one-off decode of "
        f"{len(base)} images: {build_s:.1f} s; load {out['load_before_after']}"
    )
    if a.json:
        with open(a.json, "a") as f:
            f.write(json.dumps(out) + "\n")
    return out


if __name__ == "__main__":
    main()
