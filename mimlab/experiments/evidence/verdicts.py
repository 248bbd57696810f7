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

from ...core.stats import RunDiff, claim_verdict, subtest, units_for_power, welch
from .arms import CLAIMS, stage_of
from .files import read_result


def n_units(protocol: dict, arm: str) -> int:
    """Units the protocol asks of an arm (random init and its fine-tuned 'supervised' model:
    FT seeds; every other arm: pretraining runs)."""
    if arm in ("random", "supervised"):
        return protocol["random_init_ft_seeds"]
    return protocol["pretrain_runs"][arm]


def _value(r: dict, metric: str, at: Optional[int]) -> Optional[float]:
    if metric == "shape_bias":
        sb = (r.get("shape_bias") or {}).get("shape_bias")
        return None if sb is None else 100.0 * float(sb)  # points, like top-1
    if metric == "cka":
        c = r.get("cka")
        c = c.get("cka") if isinstance(c, dict) else c
        return None if c is None else float(c)
    if metric == "psnr":
        return None if r.get("psnr") is None else float(r["psnr"])
    if metric == "ft" and at is not None:
        hit = [v for e, v in r.get("curve", []) if e == at]
        return float(hit[0]) if hit else None
    return None if r.get("top1") is None else float(r["top1"])


def unit_result(
    results: Path, arm: str, seed: int, folder: str, suffix: str = ""
) -> Optional[dict]:
    """The result file of ``arm``'s unit ``seed`` of kind ``folder`` (``ft``, ``lp_cls``,
    ...) in the stage that owns the arm; None while it does not exist."""
    return read_result(
        Path(results) / "v2" / stage_of(arm) / folder / f"{arm}-s{seed}{suffix}.json"
    )


def values(
    results: Path, protocol: dict, arm: str, metric: str, at: Optional[int] = None
) -> list[float]:
    """The arm's per-unit values of ``metric`` (``ft`` | ``ft10`` | ``lp_cls`` | ``knn`` |
    ``shape_bias`` in points; ``cka`` in [0, 1]; ``psnr`` in dB), for the units that exist;
    ``at``: FT top-1 after that epoch instead of at the end. Arm ``supervised`` is random init
    fine-tuned (its ``cka`` is recorded by the fine-tune); ``random``'s ``cka`` is random
    weights'."""
    out: list[float] = []
    if arm == "supervised" and metric != "cka":
        return out  # its other values are random init's (the same fine-tunes)
    # shape bias and the supervised model's CKA are recorded by the full-label fine-tune;
    # ft10 is the 10 %-label fine-tune
    src = "random" if arm == "supervised" else arm
    ft_record = metric in ("shape_bias", "ft10") or arm == "supervised"
    folder = "ft" if ft_record else metric
    suffix = "-lf0.1" if metric == "ft10" else ""
    for seed in range(n_units(protocol, arm)):
        r = unit_result(results, src, seed, folder, suffix)
        v = None if r is None else _value(r, metric, at)
        if v is not None:
            out.append(v)
    return out


def effect_margin(protocol: dict, metric: str) -> float:
    """The smallest effect that matters for an ``effect`` sub-test (protocol's ``margin``)."""
    if metric == "psnr":
        return protocol["margin"]["effect_fraction"] * protocol["psnr"]["paper_effect_db"]
    if metric == "cka":
        return protocol["cka"]["min_effect"]
    raise KeyError(f"no effect size is declared for metric {metric!r}")


POWER_CAP = 100  # the largest plan outcome() states


def outcome(row: dict, refuted: bool, alpha: float) -> str:
    """A judged sub-test in words: ``supports``, ``undecided`` or ``refutes`` with the way it
    fails (A below B, A above B, outside the "≈" band, or an effect smaller than its margin);
    an undecided one with the units per arm that would decide it (:func:`units_for_power`)."""
    if refuted:
        a, b, kind, below = row["a"], row["b"], row["kind"], row["diff"]["mean"] < 0
        way = {
            ">": f"{a} below {b}",
            "<": f"{a} above {b}",
            "~": f"{a} {'below' if below else 'above'} {b} beyond the margin",
            ">=": f"{a} below {b} beyond the margin",
            "effect": "an effect smaller than the margin",
        }[kind]
        return f"refutes ({way})"
    if row["p_support"] < alpha:
        return "supports"
    n = units_for_power(RunDiff(**row["diff"]), row["kind"], row["margin"], alpha, cap=POWER_CAP)
    plan = f"about {n}" if n else f"more than {POWER_CAP}"
    return f"undecided; {plan} units per arm would decide it (80 % power at the observed values)"


def judge(results: Path, protocol: dict, claim: str, at: Optional[int] = None) -> dict:
    """One claim's verdict with its sub-tests; ``not measured`` until every sub-test has all
    the units the protocol asks for."""
    text, paper, tests = CLAIMS[claim]
    frac = protocol["margin"]["approx_fraction"]
    alpha = protocol["multiplicity"]["alpha"] / 2  # one-sided: agrees with the 95 % interval
    rows, subs, missing, notes = [], [], [], []
    waiting: dict[str, dict] = {}  # arm -> units it has / needs, and of which metrics

    def short(units: dict[str, list], metric: str) -> bool:
        """Whether an arm of ``units`` ({arm: values}) lacks units; noted in ``waiting``."""
        lacking = [arm for arm, v in units.items() if len(v) < n_units(protocol, arm)]
        for arm in lacking:
            have, need = len(units[arm]), n_units(protocol, arm)
            w = waiting.setdefault(arm, {"have": have, "need": need, "metrics": []})
            w["have"] = min(w["have"], have)
            w["metrics"] += [] if metric in w["metrics"] else [metric]
        return bool(lacking)

    for a, b, metric, kind in tests:
        va, vb = values(results, protocol, a, metric, at), values(results, protocol, b, metric, at)
        if short({a: va, b: vb}, metric):
            full = (n_units(protocol, a), n_units(protocol, b))
            missing.append(f"{a} vs {b} ({metric}: {len(va)}/{full[0]} and {len(vb)}/{full[1]})")
            continue
        margin = 0.0
        if kind in ("~", ">="):  # a fraction of MAE's gain over random init, same metric/budget
            mae = values(results, protocol, "mae", metric, at)
            rnd = values(results, protocol, "random", metric, at)
            if short({"mae": mae, "random": rnd}, metric):
                missing.append(f"the margin of {a} vs {b}: MAE and random init ({metric})")
                continue
            margin = abs(frac * welch(mae, rnd).mean)
            if margin <= 0:  # no gain to take a fraction of: the margin is undefined
                notes.append(f"the margin of {a} vs {b}: MAE's gain over random init is 0")
                missing.append(notes[-1])
                continue
        elif kind == "effect":
            margin = effect_margin(protocol, metric)
        d = welch(va, vb)
        t = subtest(d, kind, margin)
        subs.append(t)
        rows.append({"a": a, "b": b, "metric": metric, "kind": kind, **t, "diff": d.to_dict()})
    if missing:
        return {
            "claim": claim,
            "verdict": "not measured",
            "missing": missing,
            "waiting": waiting,  # the units still to run
            "notes": notes,  # what else keeps it unmeasured
            "tests": rows,
        }
    v = claim_verdict(subs, alpha)
    for row, refuted in zip(rows, v["refuted"]):
        row["refuted_after_holm"] = refuted
        row["outcome"] = outcome(row, refuted, alpha)
    return {"claim": claim, "text": text, "paper": paper, "verdict": v["verdict"], "tests": rows}
