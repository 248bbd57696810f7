"""Pilot P1 of protocol v2: how long must fine-tuning run to rank initialisations?

The papers rank inits after 100 fine-tuning epochs, where random init is within 1.2 points of
what 3x the budget gives it (80.9 % at 100 epochs, 82.1 % at 300). This pilot measures the same
thing here: random init (and MAE, one 8-epoch pretraining run) fine-tuned with schedules of
several lengths on 80 % of the pool and scored on the held-out 20 % (never on test), each run
evaluated along its schedule. :func:`choose_budget` applies the protocol's rule to the results.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

from .files import read_result
from .protocol import PROTOCOL
from .runner import Runner

#: (init, schedule length in epochs), in the order they run; 10 and 30 only when 20 passes
SCHEDULES = (
    ("random", 20),
    ("random", 60),
    ("mae", 20),
    ("random", 10),
    ("random", 30),
    ("mae", 60),
)


def run_ftbudget(runner: Runner, inits: tuple = ("random",)) -> dict:
    """Run (or resume) pilot P1's schedules of ``inits`` with ``runner``; returns
    :func:`choose_budget` of what exists. Random init's schedules decide the budget (stage
    ``ftbudget``); MAE's (stage ``ftbudget-mae``) show how far MAE is from its own plateau and
    run after the core stage. MAE's pretraining run is the ``core`` stage's seed 0 recipe, kept
    under ``ftbudget``."""
    out = runner.results / "v2" / "ftbudget"
    for init, epochs in SCHEDULES:
        if init not in inits:
            continue
        if epochs in (10, 30) and not _twenty_passes(out, runner.protocol):
            continue  # 10 can only be chosen when 20 already reaches the plateau
        ck = (lambda: runner.checkpoint("ftbudget", "mae", 0)) if init == "mae" else None
        at = sorted({e for e in (*runner.protocol["ft_eval_at_epochs"], 30, 40, 60) if e < epochs})
        runner.ft_run(f"ftbudget/{init}-e{epochs}", "ftbudget/ft", ck, 0, epochs, at, holdout=True)
    return choose_budget(out, runner.protocol)


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


def _twenty_passes(out: Path, protocol: dict) -> bool:
    c = _check(_held_out_top1(out), 20, protocol["ft_epochs"]["tolerance_points"])
    return bool(c and c["ok"])


def choose_budget(out: Path, protocol: dict = PROTOCOL) -> dict:
    """Protocol v2's rule applied to the pilot's result files in ``out``: B = 20 when random init
    at 20 epochs is within the tolerance of 60 epochs, B = 10 when 10 is also within it of 30;
    when 20 is not, B = 20 all the same (the longest affordable) and the gap is reported."""
    rule = protocol["ft_epochs"]
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
