"""Pretraining throughput of every method preset at one model preset (default: the CIFAR-sized
``tiny`` ViT, batch 128): full training steps (forward + backward + AdamW + after_step/EMA),
median over repetitions, with MAE measured in the same run as the reference (ratio column).

    python benchmarks/bench_methods.py --preset tiny --batch 128 --reps 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from mimlab.core.config import METHOD_PRESETS, PretrainConfig, resolve
from mimlab.methods import build_method


def step_time(name: str, preset: str, batch: int, reps: int) -> float:
    torch.manual_seed(0)
    overrides = [f"model.preset={preset}", f"method.name={name}"]
    if name in ("maskdistill",):
        overrides.append("method.teacher_size=64")
    cfg = resolve(PretrainConfig, overrides=overrides)
    m = build_method(cfg)
    m.train()
    opt = torch.optim.AdamW(
        [p for p in m.parameters() if p.requires_grad], lr=1e-4, betas=(0.9, 0.95), foreach=True
    )
    x = torch.randn(batch, cfg.model.in_chans, cfg.model.img_size, cfg.model.img_size)

    def step(i):
        opt.zero_grad(set_to_none=True)
        m(x)["loss"].backward()
        opt.step()
        m.after_step(i + 1, 1000)

    step(0)
    ts = []
    for i in range(reps):
        t = time.perf_counter()
        step(i + 1)
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def main():
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--methods", nargs="*", default=list(METHOD_PRESETS))
    ap.add_argument("--json", help="append results as JSON lines")
    a = ap.parse_args()
    ref = step_time("mae", a.preset, a.batch, a.reps)
    print(f"# {a.preset} batch {a.batch}, {torch.get_num_threads()} threads, median of {a.reps}")
    print(f"{'method':18s} {'img/s':>8s} {'vs MAE':>7s}")
    for name in a.methods:
        t = ref if name == "mae" else step_time(name, a.preset, a.batch, a.reps)
        print(f"{name:18s} {a.batch / t:8.1f} {ref / t:7.2f}", flush=True)
        if a.json:
            with open(a.json, "a") as f:
                f.write(
                    json.dumps(
                        {
                            "method": name,
                            "preset": a.preset,
                            "batch": a.batch,
                            "img_s": a.batch / t,
                            "vs_mae": ref / t,
                        }
                    )
                    + "\n"
                )


if __name__ == "__main__":
    main()
