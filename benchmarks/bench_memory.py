"""Peak memory (RSS) of mimlab MAE training per preset and batch size.

Each configuration runs in a fresh Python process (so the peaks of different configurations
do not mix, and the allocator starts empty): import torch + mimlab, build the MAE model and a
random batch, then ``--steps`` full training steps (forward, backward, AdamW with its state;
the same step as ``bench_train.py``). The peak resident set size is read from
``/proc/self/status`` (``VmHWM``; ``resource.getrusage().ru_maxrss`` where that is missing)
after each step; the second step is the steady state (gradients and AdamW moments exist
while the activations of the next step are alive). Reported in GiB (2**30 bytes), with the
RSS after the imports (the Python + torch runtime, part of every run) and the weights +
gradients + AdamW moments (16 bytes / parameter) for comparison. DataLoader workers are
separate processes and are not included (each adds roughly its copy-on-write share).

    python benchmarks/bench_memory.py                        # tiny@128, vit_b16@16, vit_b16@64
    python benchmarks/bench_memory.py --configs vit_l16@16 --limit-gib 16
    python benchmarks/bench_memory.py --configs vit_b16@64+selective,vit_b16@64+full
                                  # model.grad_checkpointing=selective / full
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

GIB = 2**30
RESULT = "RESULT "


def proc_status_bytes(key: str):
    """``VmHWM`` / ``VmRSS`` ... of this process in bytes, or None where /proc is missing."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024  # kB
    except OSError:
        pass
    return None


def peak_rss_bytes() -> int:
    v = proc_status_bytes("VmHWM")
    if v is not None:
        return v
    import resource

    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r if sys.platform == "darwin" else r * 1024  # bytes on macOS, KiB on Linux


def rss_bytes() -> int:
    v = proc_status_bytes("VmRSS")
    return v if v is not None else peak_rss_bytes()


def child(preset: str, batch: int, steps: int, ckpt: str = "off") -> dict:
    """One configuration, in this (fresh) process; ``ckpt``: activation checkpointing mode
    (off | selective | full)."""
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import bench_train as bt

    r = {
        "bench": "memory",
        "preset": preset,
        "batch": batch,
        "steps": steps,
        "pid": os.getpid(),
        "grad_checkpointing": ckpt,
        "threads": torch.get_num_threads(),
        "rss_after_import_gib": rss_bytes() / GIB,
    }
    step, method, cfg = bt.mimlab_mae_step(
        preset, batch, overrides=[f"model.grad_checkpointing={ckpt}"]
    )
    n = sum(p.numel() for p in method.parameters())
    r.update(
        params=n,
        img_size=cfg.model.img_size,
        state_gib=16 * n / GIB,
        rss_after_build_gib=rss_bytes() / GIB,
    )
    peaks, secs = [], []
    for _ in range(steps):
        t = time.perf_counter()
        step()
        secs.append(time.perf_counter() - t)
        peaks.append(peak_rss_bytes() / GIB)
    r.update(
        peak_gib_per_step=peaks,
        step_s=secs,
        peak_gib=max(peaks),
        rss_after_steps_gib=rss_bytes() / GIB,
    )
    return r


def run_config(preset: str, batch: int, steps: int, timeout: float, ckpt: str = "off") -> dict:
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--child",
        preset,
        str(batch),
        "--steps",
        str(steps),
        "--child-ckpt",
        ckpt,
    ]
    base = {
        "bench": "memory",
        "preset": preset,
        "batch": batch,
        "steps": steps,
        "grad_checkpointing": ckpt,
    }
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {**base, "error": f"timed out after {timeout:.0f} s"}
    for line in p.stdout.splitlines()[::-1]:
        if line.startswith(RESULT):
            return json.loads(line[len(RESULT) :])
    if p.returncode < 0:
        why = f"killed by signal {-p.returncode}" + (
            " (out of memory?)" if p.returncode == -9 else ""
        )
    else:
        tail = (p.stderr.strip().splitlines() or ["no output"])[-1]
        why = f"exit status {p.returncode}: {tail}"
    return {**base, "error": why}


def meminfo_gib(key: str):
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024 / GIB
    except OSError:
        return None
    return None


#: config suffix -> activation checkpointing mode ('+ckpt', the earlier spelling, is full)
SUFFIXES = {"": "off", "selective": "selective", "full": "full", "ckpt": "full"}


def parse_configs(s: str) -> list[tuple[str, int, str]]:
    """'tiny@128,vit_b16@64+selective' -> [(preset, batch, checkpointing mode), ...]."""
    out = []
    for item in s.split(","):
        item = item.strip()
        if not item:
            continue
        base, plus, flag = item.partition("+")
        preset, _, b = base.partition("@")
        if not b.isdigit() or (plus and not flag) or flag not in SUFFIXES:
            raise SystemExit(f"bench_memory: config '{item}' is not PRESET@BATCH[+selective|+full]")
        out.append((preset, int(b), SUFFIXES[flag]))
    return out


def config_name(r: dict) -> str:
    from mimlab.core.config import checkpointing_mode  # records of earlier runs hold a bool

    mode = checkpointing_mode(r.get("grad_checkpointing", "off"))
    return f"{r['preset']}@{r['batch']}" + ("" if mode == "off" else "+" + mode)


def main():
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--configs",
        default="tiny@128,vit_b16@16,vit_b16@64",
        help="comma list of PRESET@BATCH, each measured in a fresh process; "
        "PRESET@BATCH+selective or +full with activation checkpointing "
        "(model.grad_checkpointing)",
    )
    ap.add_argument("--steps", type=int, default=2, help="training steps per configuration")
    ap.add_argument("--limit-gib", type=float, default=8.0, help="memory budget checked")
    ap.add_argument(
        "--fits",
        default="vit_b16@64",
        help="configuration whose fit in --limit-gib is reported on the last line",
    )
    ap.add_argument("--timeout", type=float, default=1800, help="seconds per configuration")
    ap.add_argument("--json", help="append results as JSON lines to this file")
    ap.add_argument("--child", nargs=2, metavar=("PRESET", "BATCH"), help=argparse.SUPPRESS)
    ap.add_argument("--child-ckpt", default="off", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        r = child(a.child[0], int(a.child[1]), a.steps, a.child_ckpt)
        print(RESULT + json.dumps(r), flush=True)
        return
    total, avail = meminfo_gib("MemTotal"), meminfo_gib("MemAvailable")
    print(
        f"# memory: {total or 0:.1f} GiB total, {avail or 0:.1f} GiB available at start; "
        f"{os.cpu_count()} cores; one fresh process per configuration",
        flush=True,
    )
    results = []
    for preset, batch, ckpt in parse_configs(a.configs):
        r = run_config(preset, batch, a.steps, a.timeout, ckpt)
        label = preset + ("" if ckpt == "off" else "+" + ckpt)
        r["limit_gib"] = a.limit_gib
        r["machine_mem_gib"] = total
        if "error" in r:
            r["fits_limit"] = None
            print(f"{label:17s} batch {batch:4d}: FAILED ({r['error']})", flush=True)
        else:
            r["fits_limit"] = bool(r["peak_gib"] <= a.limit_gib)
            steps = ", ".join(f"{v:.2f}" for v in r["peak_gib_per_step"])
            print(
                f"{label:17s} batch {batch:4d}: peak RSS {r['peak_gib']:6.2f} GiB (after each "
                f"step: {steps}) | after imports {r['rss_after_import_gib']:.2f} GiB | "
                f"weights+grads+AdamW {r['state_gib']:.2f} GiB ({r['params'] / 1e6:.1f} M "
                f"params) | {r['threads']} threads",
                flush=True,
            )
        results.append(r)
    if a.json:
        with open(a.json, "a") as f:
            for r in results:
                f.write(json.dumps(r) + "\n")
    failed = [r for r in results if r.get("error")]
    want = [r for r in results if config_name(r) == a.fits] or results
    for r in want:
        name = config_name(r)
        if r.get("error"):
            print(f"# {name} fits in {a.limit_gib:g} GiB: unknown ({r['error']})")
        else:
            verdict = "yes" if r["fits_limit"] else "NO"
            print(
                f"# {name} fits in {a.limit_gib:g} GiB: {verdict} (peak {r['peak_gib']:.2f} GiB, "
                f"{a.limit_gib - r['peak_gib']:+.2f} GiB headroom; DataLoader workers extra)"
            )
    if failed:
        sys.exit(1)


if __name__ == "__main__":
    main()
