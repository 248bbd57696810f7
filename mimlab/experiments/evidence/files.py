"""The suite's small result files: read one back, write one atomically."""

from __future__ import annotations

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


def write_result(f: Path, res: dict) -> None:
    """Write ``res`` as JSON to ``f`` through a temporary file (a crash leaves no half file)."""
    f.parent.mkdir(parents=True, exist_ok=True)
    tmp = f.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(res, indent=1, default=str))
    tmp.replace(f)
