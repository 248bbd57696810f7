"""Wall time of a sub-run across interruptions.

A sub-run killed with its session (a fine-tune resumed from its last epoch in the next one)
would otherwise report only its last segment. :func:`timed` keeps the running total in a
sidecar file under the run directories, rewritten every ``beat`` seconds from a daemon thread,
so a resumed sub-run reports the time of every attempt on this machine (at most ``beat``
seconds of a killed attempt are lost; an attempt on another machine starts from zero).
``excluded`` leaves out time spent inside ``fn`` that is counted elsewhere (a sub-run that a
fine-tune runs first, with its own result file), so the stage's sum counts it once.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Callable


def now() -> float:
    """The clock of :func:`timed` (one place to replace it in tests)."""
    return time.time()


def timed(
    sidecar: Path,
    fn: Callable[[], dict],
    beat: float = 60.0,
    excluded: Callable[[], float] = lambda: 0.0,
) -> tuple[dict, float, float]:
    """``fn()``, its wall seconds in this attempt, and in every attempt recorded in
    ``sidecar`` (which is removed when ``fn`` returns), less ``excluded()`` seconds."""
    sidecar = Path(sidecar)
    try:
        before = float(sidecar.read_text())
    except (OSError, ValueError):
        before = 0.0
    t0 = now()
    stop = threading.Event()

    def heartbeat() -> None:
        while not stop.wait(beat):
            try:
                sidecar.parent.mkdir(parents=True, exist_ok=True)
                sidecar.write_text(f"{before + now() - t0 - excluded():.1f}")
            except OSError:
                pass  # a lost heartbeat costs accuracy, never the sub-run

    th = threading.Thread(target=heartbeat, daemon=True)
    th.start()
    try:
        res = fn()
    finally:
        stop.set()
        th.join()
    took = now() - t0 - excluded()
    sidecar.unlink(missing_ok=True)
    return res, took, before + took
