"""``mimlab reproduce --suite evidence --stage <stage>``: protocol v2's stages.

* ``protocol``: write ``protocol.json`` from :data:`.protocol.PROTOCOL` (commit it before the
  runs it governs);
* ``ftbudget``: pilot P1 (:mod:`.ftbudget`).

Every other stage refuses to run until the committed ``protocol.json`` equals the code's.
"""

from __future__ import annotations

import json
from pathlib import Path

from .ftbudget import run_ftbudget
from .protocol import ProtocolMismatch, check_committed, write_protocol

STAGES = ("protocol", "ftbudget")


class EvidenceError(Exception):
    """Bad stage or a protocol that was not committed first (printed as one line)."""


def reproduce_evidence(stage: str, data: str, runs: str, results: str, workers: int = 1) -> Path:
    """Run one stage; returns the file it wrote (the protocol, or the stage's summary)."""
    res = Path(results)
    if stage not in STAGES:
        raise EvidenceError(f"unknown stage '{stage}'; stages: {', '.join(STAGES)}")
    if stage == "protocol":
        return write_protocol(res)
    try:
        check_committed(res)
    except ProtocolMismatch as e:
        raise EvidenceError(str(e)) from None
    summary = run_ftbudget(data, Path(runs) / "v2" / "ftbudget", res / "v2", workers)
    path = res / "v2" / "ftbudget" / "summary.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(summary, indent=1) + "\n")
    return path
