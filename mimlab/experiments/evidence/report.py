"""``docs/results/standard/v2/report.md`` from the committed result files alone."""

from __future__ import annotations

import json
import time
from pathlib import Path

from ..common import read_result
from .arms import CLAIMS, STAGES
from .ftbudget import choose_budget
from .verdicts import judge


def _fmt(d: dict) -> str:
    return f"{d['mean']:+.2f} [{d['lo']:+.2f}, {d['hi']:+.2f}]"


def _wall(results: Path, stage: str) -> float:
    total = 0.0
    for f in (Path(results) / "v2" / stage).rglob("*.json"):
        r = read_result(f)
        total += float((r or {}).get("wall_seconds", 0.0))
    return total


def write_report(results: Path, protocol: dict) -> Path:
    res = Path(results)
    out = res / "v2" / "report.md"
    budget = choose_budget(res / "v2" / "ftbudget")
    b = protocol["ft_epochs"]["value"]
    lines = [
        "# Evidence suite, protocol v2",
        "",
        f"Generated {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} from the result files "
        "under `docs/results/standard/v2/` (`mimlab reproduce --suite evidence --report-only`). "
        "Protocol: [protocol.md](../protocol.md), `protocol.json`.",
        "",
        "## Pilot P1: fine-tuning budget (held-out split; enters no verdict)",
        "",
        "| schedule | held-out top-1 |",
        "|---|---|",
        *[f"| {k} | {v:.2f} |" for k, v in budget["held_out_top1"].items()],
        "",
        f"Rule's choice: `ft_epochs` = {budget['ft_epochs']} "
        + (
            f"(plateau reached: {budget['plateau_reached']}, gap to 3x: "
            f"{budget['gap_at_chosen']} points)"
            if budget["decided"]
            else "(not decided yet: schedules still to run)"
        ),
        "",
        "## Verdicts",
        "",
        f"Budget: pretraining {protocol['pretrain']['epochs']} epochs "
        f"({protocol['pretrain']['steps']} steps), fine-tuning {b or '(not fixed)'} epochs; "
        "Welch 95 % intervals on per-run values, Holm within a claim.",
        "",
        "| claim | paper | ours: difference [95 % CI] per sub-test | verdict |",
        "|---|---|---|---|",
    ]
    summary = {}
    for c, (text, paper, _) in CLAIMS.items():
        j = judge(res, protocol, c) if b else {"verdict": "not measured", "tests": []}
        summary[c] = j
        ours = "; ".join(
            f"{t['a']} vs {t['b']} ({t['metric']}) {_fmt(t['diff'])}" for t in j["tests"]
        )
        lines.append(f"| ({c}) {text} | {paper} | {ours or '–'} | **{j['verdict']}** |")
    if b:
        lines += ["", "## Verdicts along the fine-tuning budget", ""]
        at = [e for e in protocol["ft_eval_at_epochs"] if e < int(b)] + [int(b)]
        lines += ["| claim | " + " | ".join(f"{e} ep" for e in at) + " |"]
        lines += ["|---|" + "---|" * len(at)]
        for c in CLAIMS:
            row = [judge(res, protocol, c, e if e != int(b) else None)["verdict"] for e in at]
            lines.append(f"| ({c}) | " + " | ".join(row) + " |")
    lines += ["", "## Wall time per stage (sum of sub-runs)", ""]
    for stage in ("ftbudget", *STAGES):
        lines.append(f"- `{stage}`: {_wall(res, stage) / 60:.1f} min")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    (res / "v2" / "summary.json").write_text(json.dumps(summary, indent=1, default=str) + "\n")
    return out
