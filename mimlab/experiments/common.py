"""What the experiment suites share: reading a finished sub-run's result file and the last-block
CKA of ``mimlab analyze cka``'s CSV."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Optional


def read_result(f: Path) -> Optional[dict]:
    """A finished sub-run's result file, or None when it is missing or unreadable (then the
    sub-run counts as not finished and runs again)."""
    if f.is_file():
        try:
            return json.loads(f.read_text())
        except ValueError:
            return None
    return None


def cka_last_block(csv_path: Path) -> dict:
    """{model: {str(ratio): CKA of the last block}} from the ``cka.csv`` of
    ``mimlab analyze cka`` ({} when the file is missing)."""
    if not csv_path.is_file():
        return {}
    last: dict = {}
    with csv_path.open() as fh:
        for r in csv.DictReader(fh):
            key = (r["model"], float(r["ratio"]))
            if int(r["block"]) >= last.get(key, (-1, 0.0))[0]:
                last[key] = (int(r["block"]), float(r["cka"]))
    out: dict = {}
    for (m, ratio), (_, v) in last.items():
        out.setdefault(m, {})[str(ratio)] = v
    return out
