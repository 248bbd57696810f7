"""Decode + RandomResizedCrop at 224 px: images/s per CPU core (how many cores feed a GPU).

One process, one torch thread, no DataLoader: the per-sample work a data-loader worker does for
mimlab's training set, timed stage by stage over a generated folder of natural-photo JPEGs
(``bench_data.make_photo_folder``: crops of scikit-image's bundled photos, quality 90) at each
``--sides`` short side (256: ImageNet copies resized to 256 px, as DailyMAE/FFCV-style
pipelines store them; 375: about the short side of full-size ImageNet JPEGs):

* ``decode``: file read + JPEG decode to a uint8 RGB tensor
  (``mimlab.data.datasets.load_image``, PIL), images/s;
* ``item``: one training item, ``dataset[(index, epoch)]`` = decode + seeded
  RandomResizedCrop to 224 (bicubic, scale 0.2-1) + flip + to-tensor + normalise;
* ``cores per 1,000 img/s``: 1000 / item rate, the cores a consumer of 1,000 img/s needs.

Each stage runs ``--reps`` passes over the files (median), after one warm-up pass; the load
average before and after is printed (other jobs on a shared machine lower the rates).

    python benchmarks/bench_decode.py --images 256 --sides 256,375 --json out.jsonl
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_data as bd  # noqa: E402  (benchmarks/ is not a package)

from mimlab.core.config import DataConfig  # noqa: E402
from mimlab.data.datasets import build_dataset, load_image  # noqa: E402


def rate(fn, n: int, reps: int) -> float:
    """Median images/s of ``reps`` timed passes of ``fn(i)`` for i < n (after one warm-up)."""
    for i in range(n):
        fn(i)
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        for i in range(n):
            fn(i)
        out.append(n / (time.perf_counter() - t0))
    return statistics.median(out)


def run_side(side: int, args) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        root = bd.make_photo_folder(Path(tmp), args.images, side)
        files = sorted((root / "train" / "photos").glob("*.jpg"))
        desc = bd.describe_files(files)
        ds = build_dataset(DataConfig(path=str(root)), "train", 224, 3, 0, True, False)
        n = len(ds)
        decode = rate(lambda i: load_image(str(files[i]), 3), n, args.reps)
        item = rate(lambda i: ds[(i, 1)], n, args.reps)
    return {
        "side": side,
        "files": desc,
        "decode_img_s_per_core": round(decode, 1),
        "item_img_s_per_core": round(item, 1),
        "cores_per_1000_img_s": round(1000 / item, 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=256, help="generated files per side")
    ap.add_argument("--sides", default="256,375", help="short sides (px), comma list")
    ap.add_argument("--reps", type=int, default=3, help="timed passes (median)")
    ap.add_argument("--json", help="append results as JSON lines to this file")
    args = ap.parse_args()
    torch.set_num_threads(1)
    load0 = os.getloadavg()
    rows = [run_side(int(s), args) for s in args.sides.split(",")]
    load1 = os.getloadavg()
    meta = {
        "bench": "decode",
        "cpu": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "load_before": [round(v, 2) for v in load0],
        "load_after": [round(v, 2) for v in load1],
    }
    print(f"load average before {meta['load_before']}, after {meta['load_after']}")
    for r in rows:
        f = r["files"]
        print(
            f"short side {r['side']} px ({f}): decode {r['decode_img_s_per_core']} img/s/core, "
            f"decode + RandomResizedCrop 224 + flip + normalise {r['item_img_s_per_core']} "
            f"img/s/core -> {r['cores_per_1000_img_s']} cores per 1,000 img/s"
        )
    if args.json:
        with open(args.json, "a") as fh:
            for r in rows:
                fh.write(json.dumps({**meta, **r}) + "\n")


if __name__ == "__main__":
    main()
