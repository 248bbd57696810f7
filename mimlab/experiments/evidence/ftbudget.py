"""Pilot P1 of protocol v2: how long must fine-tuning run to rank initialisations?

The papers rank inits after 100 fine-tuning epochs, where random init is within 1.2 points of
what 3x the budget gives it (80.9 % at 100 epochs, 82.1 % at 300). This pilot measures the same
thing here: random init (and MAE, one 8-epoch pretraining run) fine-tuned with schedules of
several lengths on 80 % of the pool and scored on the held-out 20 % (never on test), each run
evaluated along its schedule. :func:`choose_budget` applies the protocol's rule to the results.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Optional

from ... import tasks
from ...core.config import FinetuneConfig, PretrainConfig, resolve
from ..common import read_result
from .protocol import PROTOCOL

#: (init, schedule length in epochs), in the order they run; 10 and 30 only when 20 passes
SCHEDULES = (
    ("random", 20),
    ("random", 60),
    ("mae", 20),
    ("random", 10),
    ("random", 30),
    ("mae", 60),
)
HOLDOUT = 0.2


def ft_overrides(p: dict, epochs: int, pretrained: Optional[str], holdout: bool) -> list[str]:
    """The fine-tuning overrides of protocol v2's recipe for a schedule of ``epochs``."""
    r = p["ft_recipe"]
    ld = r["layer_decay"]["pretrained" if pretrained else "random"]
    at = sorted({e for e in (*p["ft_eval_at_epochs"], 30, 40, 60) if e < epochs})
    ov = [
        f"optim.epochs={epochs}",
        f"optim.batch_size={p['pretrain']['batch']}",
        f"optim.base_lr={r['base_lr_per_256']:g}",
        f"optim.warmup_epochs={max(1.0, 0.05 * epochs):g}",
        "optim.weight_decay=0.05",
        f"optim.layer_decay={ld}",
        f"model.drop_path={r['drop_path']}",
        f"finetune.label_smoothing={r['label_smoothing']}",
        f"finetune.mixup={r['mixup']}",
        f"finetune.cutmix={r['cutmix']}",
        f"finetune.eval_at=[{','.join(str(e) for e in at)}]",
        "run.save_every_steps=0",
        "run.log_every=50",
    ]
    if holdout:
        ov.append(f"data.holdout={HOLDOUT}")
    ov += [f"finetune.pretrained={pretrained}"] if pretrained else [f"model.preset={p['model']}"]
    return ov


def _common(p: dict, data: str, runs: Path, name: str, seed: int, workers: int) -> list[str]:
    return [
        f"data.path={data}",
        f"run.out_dir={runs}",
        f"run.name={name}",
        f"run.seed={seed}",
        "run.progress=false",
        f"data.num_workers={workers}",
        f"data.limit={p['pool']['images']}",
        f"data.subset_seed={p['pool']['subset_seed']}",
    ]


def _step(results: Path, name: str, fn) -> dict:
    f = results / f"{name}.json"
    old = read_result(f)
    if old is not None:
        return old
    print(f"[evidence] {name}: running ...", flush=True)
    t0 = time.time()
    res = {**fn(), "wall_seconds": round(time.time() - t0, 1)}
    f.parent.mkdir(parents=True, exist_ok=True)
    f.write_text(json.dumps(res, indent=1, default=str))
    print(f"[evidence] {name}: done in {time.time() - t0:.0f} s", flush=True)
    return res


def run_ftbudget(data: str, runs: Path, results: Path, workers: int = 1) -> dict:
    """Run (or resume) pilot P1; returns :func:`choose_budget` of what exists."""
    p = PROTOCOL
    out = Path(results) / "ftbudget"
    mae_ckpt: list = []

    def mae() -> str:
        if not mae_ckpt:
            name = "mae-pretrain-s0"

            def fn() -> dict:
                ov = _common(p, data, runs / "pretrain", name, 0, workers) + [
                    f"model.preset={p['model']}",
                    "method.name=mae",
                    f"optim.epochs={p['pretrain']['epochs']}",
                    f"optim.batch_size={p['pretrain']['batch']}",
                    "optim.base_lr=1.5e-3",
                    "optim.warmup_epochs=1",
                    "run.resume=auto",
                    "run.log_every=20",
                    "run.save_every_steps=100",
                ]
                return tasks.pretrain(resolve(PretrainConfig, overrides=ov))

            res = _step(out, name, fn)
            if not Path(res.get("checkpoint", "")).is_file():  # lost with its machine
                (out / f"{name}.json").unlink()
                res = _step(out, name, fn)
            mae_ckpt.append(res["checkpoint"])
        return mae_ckpt[0]

    for init, epochs in SCHEDULES:
        if epochs in (10, 30) and not _twenty_passes(out):
            continue  # 10 can only be chosen when 20 already reaches the plateau
        name = f"{init}-e{epochs}"

        def fn(init=init, epochs=epochs, name=name) -> dict:
            ck = mae() if init == "mae" else None
            ov = _common(p, data, runs / "ft", name, 0, workers) + ft_overrides(
                p, epochs, ck, holdout=True
            )
            res = tasks.finetune(tasks.resolve_run_config(FinetuneConfig, overrides=ov))
            res.pop("correct", None)  # held-out correctness: not needed, keeps the file small
            return res

        _step(out, name, fn)
    return choose_budget(out)


def _check(top: dict, b: int, tol: float) -> Optional[dict]:
    a, a3 = top.get(f"random-e{b}"), top.get(f"random-e{3 * b}")
    if a is None or a3 is None:
        return None
    return {"B": b, "top1_B": a, "top1_3B": a3, "gap": round(a3 - a, 2), "ok": a >= a3 - tol}


def _held_out_top1(out: Path) -> dict:
    top = {}
    for f in sorted(Path(out).glob("*-e*.json")):
        r = read_result(f)
        if r is not None and r.get("top1") is not None:
            top[f.stem] = float(r["top1"])
    return top


def _twenty_passes(out: Path) -> bool:
    c = _check(_held_out_top1(out), 20, PROTOCOL["ft_epochs"]["tolerance_points"])
    return bool(c and c["ok"])


def choose_budget(out: Path) -> dict:
    """Protocol v2's rule applied to the pilot's result files in ``out``: B = 20 when random init
    at 20 epochs is within the tolerance of 60 epochs, B = 10 when 10 is also within it of 30;
    when 20 is not, B = 20 all the same (the longest affordable) and the gap is reported."""
    rule = PROTOCOL["ft_epochs"]
    top = _held_out_top1(out)
    c20, c10 = (_check(top, b, rule["tolerance_points"]) for b in (20, 10))
    chosen: Optional[int] = None
    if c20 is not None and not c20["ok"]:
        chosen = rule["affordable_max"]
    elif c20 is not None and c10 is not None:
        chosen = 10 if c10["ok"] else 20
    gap = {10: c10, 20: c20}.get(chosen) if chosen else None
    return {
        "held_out_top1": top,
        "checks": [c for c in (c10, c20) if c is not None],
        "ft_epochs": chosen,
        "decided": chosen is not None,
        "plateau_reached": bool(gap and gap["ok"]),
        "gap_at_chosen": gap["gap"] if gap else math.nan,
    }
