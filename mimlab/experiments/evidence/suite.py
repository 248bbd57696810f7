"""``mimlab reproduce --suite evidence --stage <stage>``: protocol v2's stages.

* ``protocol``: write ``protocol.json`` from :data:`.protocol.PROTOCOL` (commit it before the
  runs it governs);
* ``ftbudget``: pilot P1 (:mod:`.ftbudget`), random init's schedules, which decide the budget;
  ``ftbudget-mae``: its MAE schedules (after ``core``);
* ``core``, ``contrastive``, ``smalldata``, ``rmae``, ``augment`` (:data:`.arms.STAGES`): every
  unit of the stage's arms and of random init, fine-tuned and probed (:mod:`.runner`).

Every stage but ``protocol`` refuses to run until the committed ``protocol.json`` equals the
code's; every stage ends by regenerating ``v2/report.md`` (also ``--report-only``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from .arms import STAGES as ARM_STAGES
from .ftbudget import run_ftbudget
from .protocol import PROTOCOL, ProtocolMismatch, check_committed, write_protocol
from .report import write_report
from .runner import EvidenceError, Runner

STAGES = ("protocol", "ftbudget", *ARM_STAGES, "ftbudget-mae")

__all__ = ["EvidenceError", "STAGES", "reproduce_evidence"]


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
