"""``mimlab reproduce --suite evidence --stage <stage>``: protocol v2's stages.

* ``protocol``: write ``protocol.json`` from :data:`.protocol.PROTOCOL` (commit it before the
  runs it governs);
* ``ftbudget``: pilot P1 (:mod:`.ftbudget`), random init's schedules, which decide the budget;
  ``ftbudget-mae``: its MAE schedules (after ``core``);
* ``core``, ``contrastive``, ``smalldata``, ``rmae``, ``augment`` (:data:`.arms.STAGES`): every
  unit of the stage's arms and of random init, fine-tuned and probed (:mod:`.runner`).

Every stage but ``protocol`` refuses to run until the committed ``protocol.json`` equals the
code's; every stage ends by regenerating ``v2/report.md`` (also ``--report-only``).

:func:`reproduce_profile` runs the same engine with a profile (:mod:`.profiles`: ``--suite
quick`` is ``smoke``, ``--suite full`` is ``gpu``) into its own folder, run directories and
result files alike.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from .arms import STAGES as ARM_STAGES
from .ftbudget import run_ftbudget
from .profiles import PROFILES
from .protocol import PROTOCOL, ProtocolMismatch, check_committed, claim_folder, write_protocol
from .report import write_report
from .runner import EvidenceError, Runner

STAGES = ("protocol", "ftbudget", *ARM_STAGES, "ftbudget-mae")

__all__ = ["EvidenceError", "STAGES", "reproduce_evidence", "reproduce_profile"]


def reproduce_evidence(
    stage: Optional[str], data: str, runs: str, results: str, workers: int = 1
) -> Path:
    """Run one stage (``None``: only the report); returns the file it wrote."""
    res = Path(results)
    if stage is not None and stage not in STAGES:
        raise EvidenceError(f"unknown stage '{stage}'; stages: {', '.join(STAGES)}")
    if stage == "protocol":
        return write_protocol(res)
    try:
        check_committed(res)
    except ProtocolMismatch as e:
        raise EvidenceError(str(e)) from None
    stimuli = Path(data).parent / PROTOCOL["shape_bias"]["stimuli_beside_data"]
    runner = Runner(
        PROTOCOL, data, Path(runs), res, workers, str(stimuli) if stimuli.is_dir() else None
    )
    if stage in ("ftbudget", "ftbudget-mae"):
        summary = run_ftbudget(runner, ("mae",) if stage == "ftbudget-mae" else ("random",))
        path = res / "v2" / "ftbudget" / "summary.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(summary, indent=1) + "\n")
    elif stage is not None:
        runner.run_stage(stage, ARM_STAGES[stage][0])
    return write_report(res, PROTOCOL)


def reproduce_profile(
    profile: str,
    data: str,
    out: str,
    stage: Optional[str] = None,
    workers: Optional[int] = None,
) -> Path:
    """Run every stage of the engine (or ``stage`` alone) with ``profile``'s protocol: result
    files under ``<out>/v2/``, run directories under ``<out>/runs/``, the report at
    ``<out>/v2/report.md`` (returned). Finished sub-runs are skipped, so a second call resumes
    (and does no new work once everything is done)."""
    if profile not in PROFILES:
        raise EvidenceError(f"unknown profile '{profile}'; profiles: {', '.join(PROFILES)}")
    if stage is not None and stage not in ARM_STAGES:
        raise EvidenceError(f"unknown stage '{stage}'; stages: {', '.join(ARM_STAGES)}")
    root = Path(data)
    if not ((root / "train").is_dir() and (root / "test").is_dir()):
        raise EvidenceError(f"--data {data}: needs a labelled folder with train/ and test/")
    p, res = PROFILES[profile](), Path(out)
    try:
        claim_folder(res, p)
    except ProtocolMismatch as e:
        raise EvidenceError(str(e)) from None
    n = p.get("workers", 1) if workers is None else workers
    runner = Runner(p, str(root), res / "runs", res, n)
    for name, (arms, _) in ARM_STAGES.items():
        if stage in (None, name):
            runner.run_stage(name, arms)
    return write_report(res, p)
