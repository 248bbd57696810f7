"""Protocol v2's verdicts from the committed result files alone.

Per-unit values (one per pretraining run; random init: per FT seed) are read from the result
files, compared with Welch's t (:func:`mimlab.core.stats.welch`) and combined per claim with
Holm (:func:`mimlab.core.stats.claim_verdict`). "≈" margins are a fraction of MAE's gain over
random init in the same metric and at the same FT budget. ``at`` gives the verdict at an
earlier point of the fine-tuning schedule (the curve every FT run records), so the report can
show whether an ordering is stable along the budget.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from ...core.stats import claim_verdict, subtest, welch
from ..common import read_result
from .arms import CLAIMS, stage_of


def values(
    results: Path, protocol: dict, arm: str, metric: str, at: Optional[int] = None
) -> list[float]:
    """The arm's per-unit values of ``metric`` (``ft`` | ``lp_cls`` | ``knn`` | ``shape_bias``,
    in points), for the units that exist; ``at``: FT top-1 after that epoch instead of at the
    end."""
    n = protocol["random_init_ft_seeds"] if arm == "random" else protocol["pretrain_runs"][arm]
    out = []
    # shape bias is recorded by the full-label fine-tune; ft10 is the 10 %-label fine-tune
    folder = "ft" if metric in ("shape_bias", "ft10") else metric
    suffix = "-lf0.1" if metric == "ft10" else ""
    for seed in range(n):
        f = Path(results) / "v2" / stage_of(arm) / folder / f"{arm}-s{seed}{suffix}.json"
        r = read_result(f)
        if r is None:
            continue
        if metric == "shape_bias":
            sb = (r.get("shape_bias") or {}).get("shape_bias")
            if sb is not None:
                out.append(100.0 * float(sb))  # points, like top-1
        elif metric == "ft" and at is not None:
            hit = [v for e, v in r.get("curve", []) if e == at]
            if hit:
                out.append(float(hit[0]))
        elif r.get("top1") is not None:
            out.append(float(r["top1"]))
    return out


def judge(results: Path, protocol: dict, claim: str, at: Optional[int] = None) -> dict:
    """One claim's verdict with its sub-tests; ``not measured`` until every sub-test has all
    the units the protocol asks for."""
    text, paper, tests = CLAIMS[claim]
    frac = protocol["margin"]["approx_fraction"]
    alpha = protocol["multiplicity"]["alpha"] / 2  # one-sided: agrees with the 95 % interval
    rows, subs, missing = [], [], []
    for a, b, metric, kind in tests:
        va, vb = values(results, protocol, a, metric, at), values(results, protocol, b, metric, at)
        full = (
            protocol["random_init_ft_seeds"] if a == "random" else protocol["pretrain_runs"][a],
            protocol["random_init_ft_seeds"] if b == "random" else protocol["pretrain_runs"][b],
        )
        if len(va) < full[0] or len(vb) < full[1]:
            missing.append(f"{a} vs {b} ({metric}: {len(va)}/{full[0]} and {len(vb)}/{full[1]})")
            continue
        margin = 0.0
        if kind in ("~", ">="):  # a fraction of MAE's gain over random init, same metric/budget
            mae = values(results, protocol, "mae", metric, at)
            rnd = values(results, protocol, "random", metric, at)
            if (
                len(mae) < protocol["pretrain_runs"]["mae"]
                or len(rnd) < protocol["random_init_ft_seeds"]
            ):
                missing.append(f"the margin of {a} vs {b}: MAE and random init ({metric})")
                continue
            margin = abs(frac * welch(mae, rnd).mean)
        d = welch(va, vb)
        t = subtest(d, kind, margin)
        subs.append(t)
        rows.append({"a": a, "b": b, "metric": metric, "kind": kind, **t, "diff": d.to_dict()})
    if missing:
        return {"claim": claim, "verdict": "not measured", "missing": missing, "tests": rows}
    v = claim_verdict(subs, alpha)
    for row, refuted in zip(rows, v["refuted"]):
        row["refuted_after_holm"] = refuted
    return {"claim": claim, "text": text, "paper": paper, "verdict": v["verdict"], "tests": rows}
