"""``docs/results/standard/v2/report.md`` from the committed result files alone."""

from __future__ import annotations

import json
import time
from pathlib import Path

from .arms import ARMS, CLAIMS, STAGES
from .figures import plot_ft_curves
from .files import read_result
from .ftbudget import choose_budget
from .verdicts import judge, values

#: metric -> (column, decimals)
METRIC_COLUMNS = {
    "ft": ("FT top-1", 2),
    "ft10": ("10 %-label FT", 2),
    "lp_cls": ("linear probe", 2),
    "knn": ("k-NN", 2),
    "cka": ("CKA (masked, full)", 4),
    "psnr": ("PSNR dB", 2),
    "shape_bias": ("shape bias %", 1),
}


def _cell(v: list, nd: int) -> str:
    if not v:
        return "–"
    m = sum(v) / len(v)
    if len(v) == 1:  # one unit has no spread to show
        return f"{m:.{nd}f} (1)"
    sd = (sum((x - m) ** 2 for x in v) / (len(v) - 1)) ** 0.5
    return f"{m:.{nd}f} ± {sd:.{nd}f} ({len(v)})"


def arm_table(res: Path, protocol: dict) -> list[str]:
    """Per arm and metric: mean ± sd over its units (number of units); arms with no unit yet
    are left out."""
    rows = []
    for arm in ("random", "supervised", *ARMS):
        cells = [_cell(values(res, protocol, arm, m), nd) for m, (_, nd) in METRIC_COLUMNS.items()]
        if any(c != "–" for c in cells):
            label = {"random": "random init", "supervised": "random init, fine-tuned"}.get(
                arm, ARMS[arm].label if arm in ARMS else arm
            )
            rows.append(f"| `{arm}` ({label}) | " + " | ".join(cells) + " |")
    if not rows:
        return ["No unit has finished yet."]
    head = "| arm | " + " | ".join(c for c, _ in METRIC_COLUMNS.values()) + " |"
    return [head, "|---|" + "---|" * len(METRIC_COLUMNS), *rows]


def _side_results(res: Path) -> list[str]:
    out = []
    for f in sorted((res / "v2").glob("*/lrcheck/*.json")):
        r = read_result(f) or {}
        knn = ", ".join(f"x{k}: {v:.2f}" for k, v in r.get("held_out_knn", {}).items())
        out.append(
            f"- pretraining lr of `{f.stem}` (held-out k-NN): {knn}; best x{r.get('best_factor')}"
        )
    remade = [
        (f"{f.parent.parent.name}/{f.stem}", r["remade"])
        for f in sorted((res / "v2").glob("*/pretrain/*.json"))
        if (r := read_result(f) or {}).get("remade")
    ]
    if remade:
        ok = {n: all(x["same"] for x in rm) for n, rm in remade}
        names = ", ".join(f"`{n}`" + ("" if same else " DIFFERS") for n, same in ok.items())
        out.append(
            f"- pretraining checkpoints lost with a machine and remade: {len(ok)}; ending "
            f"where the recorded run ended (bitwise): {sum(ok.values())} ({names})"
        )
    tt = read_result(res / "v2" / "augment" / "teacher_targets.json")
    for k in ("v2", "v1") if tt else ():
        d = tt[k]
        out.append(
            f"- MaskDistill targets, {k} teacher `{d['teacher']}` at {d['teacher_size']} px "
            f"({d['teacher_map'][0]}x{d['teacher_map'][1]} map): neighbour cosine "
            f"{d['neighbour_cosine']:.3f}, far-patch cosine {d['far_cosine']:.3f}"
        )
    return out or ["None yet."]


def _fmt(d: dict) -> str:
    return f"{d['mean']:+.2f} [{d['lo']:+.2f}, {d['hi']:+.2f}]"


def _subtest(t: dict) -> str:
    """One sub-test's cell text: arms, metric, the test with its margin, the difference with
    its interval and, once the claim is judged, what the sub-test says."""
    test = {">": ">", "<": "<", "~": "≈ ±{m}", ">=": "≥ −{m}", "effect": "effect ≥ {m}"}
    m = f"{t['margin']:.3g}" if t.get("margin") else ""
    head = f"{t['a']} vs {t['b']} ({t['metric']}, {test[t['kind']].format(m=m)})"
    tail = f": {t['outcome']}" if "outcome" in t else ""
    return f"{head} {_fmt(t['diff'])}{tail}"


def _first_made(pre: dict) -> float:
    """A pretraining file's wall seconds before any remake (each remake records its own; a
    lone remake recorded before that was its last attempt)."""
    later = sum(
        float(x.get("wall_seconds", pre.get("wall_seconds_last_attempt", 0.0)))
        for x in pre.get("remade", [])
    )
    return float(pre.get("wall_seconds", 0.0)) - later


def _own_seconds(f: Path, r: dict) -> float:
    """A sub-run's own wall seconds. Files written before ``wall_exclusive`` count, in a unit's
    first fine-tune, the pretraining run it made first (a lazy checkpoint) that its own file
    counts too: that first making is left out here, so the stage's sum counts it once."""
    wall = float(r.get("wall_seconds", 0.0))
    if r.get("wall_exclusive") or f.parent.name != "ft" or "-lf" in f.stem or "-full" in f.stem:
        return wall
    pre = read_result(f.parent.parent / "pretrain" / f.name)
    return wall if pre is None else wall - _first_made(pre)  # None: random init


def _wall(results: Path, stage: str) -> str:
    """The stage's wall time in minutes and its number of finished sub-runs."""
    total, n = 0.0, 0
    for f in (Path(results) / "v2" / stage).rglob("*.json"):
        r = read_result(f)
        if r is not None:
            total, n = total + _own_seconds(f, r), n + 1
    return f"{total / 60:.1f} min ({n} sub-runs finished)" if n else "not started"


def _head(res: Path, protocol: dict) -> list[str]:
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    if "profile" not in protocol:  # protocol v2 itself
        return [
            "# Evidence suite, protocol v2",
            "",
            f"Generated {when} from the result files under `docs/results/standard/v2/` "
            "(`mimlab reproduce --suite evidence --report-only`). Protocol: "
            "[protocol.md](../protocol.md), `protocol.json`.",
            "",
        ]
    name = protocol["profile"]
    return [
        f"# Evidence engine, {name} profile",
        "",
        f"**{protocol['note']}**",
        "",
        f"Generated {when} from the result files under `{res / 'v2'}`; the profile's protocol "
        f"(protocol v2 at model `{protocol['model']}`, {protocol['pool']['images']} pool images, "
        f"{protocol['pretrain']['steps']} pretraining steps, units per arm "
        f"{max(protocol['pretrain_runs'].values())}) is `{res / 'protocol.json'}`.",
        "",
    ]


def _pilot(budget: dict) -> list[str]:
    return [
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
    ]


def write_report(results: Path, protocol: dict) -> Path:
    res = Path(results)
    out = res / "v2" / "report.md"
    budget = choose_budget(res / "v2" / "ftbudget", protocol)
    b = protocol["ft_epochs"]["value"]
    lines = (
        _head(res, protocol)
        + (_pilot(budget) if "profile" not in protocol else [])
        + [
            "## Verdicts",
            "",
            f"Budget: pretraining {protocol['pretrain']['epochs']} epochs "
            f"({protocol['pretrain']['steps']} steps), fine-tuning {b or '(not fixed)'} epochs; "
            "Welch 95 % intervals on per-run values, Holm within a claim.",
            "",
            "| claim | paper | ours: difference [95 % CI] per sub-test | verdict |",
            "|---|---|---|---|",
        ]
    )
    summary = {}
    for c, (text, paper, _) in CLAIMS.items():
        j = judge(res, protocol, c) if b else {"verdict": "not measured", "tests": []}
        summary[c] = j
        ours = "; ".join(_subtest(t) for t in j["tests"])
        w = j.get("waiting") or {}  # units still to run: say which, so progress shows
        todo = ", ".join(
            f"{arm} {x['have']}/{x['need']} ({', '.join(x['metrics'])})" for arm, x in w.items()
        )
        ours = "; ".join(
            filter(None, [ours, todo and f"units so far: {todo}", *j.get("notes", [])])
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
        fig = plot_ft_curves(res, protocol, res / "v2" / "ft_curves.png")
        if fig is not None:
            lines += [
                "",
                "Test top-1 along the fine-tuning schedule, one panel per stage: each unit thin, "
                "the arm's mean thick (units in brackets); random init and MAE dashed for "
                "reference.",
                "",
                f"![test top-1 along the fine-tuning schedule]({fig.name})",
            ]
    lines += ["", "## Per arm: mean ± sd over units (units)", ""]
    lines += [
        "Units: pretraining runs (random init: FT seeds). FT at the protocol's budget; CKA: last "
        "block at 75 % masking (random init = random weights; 'fine-tuned' = the supervised "
        "model); shape bias: CIFAR-10 protocol of the cue-conflict stimuli.",
        "",
        *arm_table(res, protocol),
        "",
        "## Settings checked beside the claims",
        "",
        *_side_results(res),
    ]
    lines += [
        "",
        "## Wall time per stage (sum of sub-runs)",
        "",
        "Every attempt of a sub-run on one machine counts (a heartbeat keeps the time of an "
        "attempt killed with its session), except in result files written before that was "
        "recorded (no `wall_seconds_last_attempt`), which count their last attempt only. A "
        "pretraining run made inside a fine-tune counts once, in its own file. The "
        "machine was shared with other work for most of it: these are not idle timings.",
        "",
    ]
    for stage in ("ftbudget", *STAGES):
        lines.append(f"- `{stage}`: {_wall(res, stage)}")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    (res / "v2" / "summary.json").write_text(json.dumps(summary, indent=1, default=str) + "\n")
    return out
